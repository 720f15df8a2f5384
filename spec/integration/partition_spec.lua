-- Partitioned projections (partition = "stream") on several instances with
-- several workers each, on a real PostgreSQL.
local h = require "helpers"
local scalar, pgbin = h.scalar, h.pgbin
local core = require "projhost.core"

-- Per stream: a count in a table, the last version in the state (a handler
-- that sees a version out of order raises, so the spec fails), and one row
-- per applied event under a unique key (an event applied twice fails).
local PBAL = [[
return {
	name = "pbal",
	from = { category = "pacct" },
	partition = "stream",
	setup = {
		"CREATE TABLE IF NOT EXISTS pcount (stream text PRIMARY KEY, n bigint NOT NULL)",
		"CREATE TABLE IF NOT EXISTS papplied (stream text, version bigint, PRIMARY KEY (stream, version))",
	},
	init = function() return { last = 0, n = 0 } end,
	when = {
		Inc = function(s, e, ctx)
			if e.version ~= s.last + 1 then
				error("out of order: " .. e.stream .. " got " .. e.version .. " after " .. s.last)
			end
			s.last, s.n = e.version, s.n + 1
			ctx:exec("INSERT INTO pcount VALUES ($1, 1) ON CONFLICT (stream) DO UPDATE SET n = pcount.n + 1", e.stream)
			ctx:exec("INSERT INTO papplied VALUES ($1, $2)", e.stream, e.version)
		end,
	},
	on_error = function() return "fail" end,
}
]]

local function applied(conn)
	local rows = conn:query("SELECT count(*) AS n FROM papplied")
	return rows and tonumber(rows[1].n) or 0
end

local function assert_matches_truth(conn)
	local truth = assert(conn:query([[SELECT stream_id AS stream, count(*)::text AS n
		FROM projhost.events WHERE stream_id LIKE 'pacct-%' GROUP BY 1 ORDER BY 1]]))
	local model = assert(conn:query("SELECT stream, n::text AS n FROM pcount ORDER BY 1"))
	assert.equal(#truth, #model)
	assert.same(truth, model)
	-- each state saw its stream's versions 1..N in order
	local bad = scalar(conn, [[SELECT count(*) FROM projhost.checkpoints c
		JOIN projhost.streams s ON s.stream_id = c.partition
		WHERE c.projection = 'pbal' AND ((c.state->>'last')::bigint <> s.version
			OR (c.state->>'n')::bigint <> s.version OR c.last_pos <> s.version)]])
	assert.equal("0", bad)
	assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status <> 'running'"))
end

describe("partitioned projections", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("partition")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		h.write_file(dir .. "/pbal.lua", PBAL)
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("catches up many streams from the streams table with --once", function()
		local lines = {}
		for i = 1, 5000 do
			lines[i] = string.format('{"stream":"pacct-%d","type":"Inc"}', i % 500)
		end
		local file = h.write_file(h.tmpdir() .. "/e.ndjson", table.concat(lines, "\n"))
		assert.equal(0, (h.run({ "append", "--file", file, "--db", dsn })))
		local code, out, err = h.run({ "run", "--once", "--workers", "2", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		assert.matches("pbal caught up", err, 1, true)
		assert_matches_truth(conn)
		assert.equal(5000, applied(conn))
	end)

	it("analyzes projhost.checkpoints while a new projection fills it", function()
		-- 2,500 streams: the checkpoints table grows from nothing within one
		-- catch-up, faster than autovacuum looks at it
		local lines = {}
		for i = 1, 2500 do lines[i] = string.format('{"stream":"pacct-%d","type":"Inc"}', i) end
		local file = h.write_file(h.tmpdir() .. "/e.ndjson", table.concat(lines, "\n"))
		assert.equal(0, (h.run({ "append", "--file", file, "--db", dsn })))
		assert(conn:exec("ALTER TABLE projhost.checkpoints SET (autovacuum_enabled = false)"))
		local code, out, err = h.run({ "run", "--once", "--workers", "1", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		assert.equal(2500, applied(conn))
		-- the planner knows the table's size (the stats of an empty table
		-- made every job scan all of it)
		h.wait_until(function()
			return tonumber(scalar(conn, [[SELECT reltuples FROM pg_class
				WHERE oid = 'projhost.checkpoints'::regclass]])) >= 1000
		end, 10, "checkpoints to be analyzed")
	end)

	it("3 instances x 2 workers share 2,000 streams under live appends, one SIGKILLed midway", function()
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir }))) -- schema and tables
		local env = { PROJHOST_BATCH_SIZE = 5 }
		local args = { "run", "--workers", "2", "--db", dsn, dir }
		local hosts = { h.spawn(args, { env = env }), h.spawn(args, { env = env }), h.spawn(args, { env = env }) }
		local script = h.write_file(h.tmpdir() .. "/w.sql", [[
\set s random(1, 2000)
BEGIN;
SELECT projhost.append('pacct-' || :s, NULL, '[{"type":"Inc"}]');
SELECT pg_sleep(random() * 0.002);
COMMIT;
]])
		-- 20,000 single-event transactions from 8 writers, concurrent
		-- appends to the same streams included
		local writers = io.popen(string.format("%s -n -c 8 -j 2 -t 2500 -f %s '%s' 2>&1",
			pgbin("pgbench"), script, dsn))
		h.wait_until(function() return applied(conn) >= 4000 end, 120, "4,000 events applied")
		core.kill(hosts[1].pid, 9)
		hosts[1]:wait(10)
		hosts[1] = h.spawn(args, { env = env })
		local report = writers:read("*a")
		writers:close()
		assert.matches("number of transactions actually processed: 20000", report, 1, true)
		h.wait_until(function() return applied(conn) >= 20000 end, 120, "every event applied")
		for _, p in ipairs(hosts) do p:kill(15) end
		for _, p in ipairs(hosts) do assert.equal(0, p:wait(15), p:output()) end
		assert.equal(20000, applied(conn))
		assert_matches_truth(conn)
	end)

	it("writes a new partition's checkpoint row with the batch that commits it, so a row made meanwhile sends the batch round again", function()
		-- the first event of pacct-race sleeps in its handler: meanwhile
		-- another instance claims the partition (a row at version 0, as an
		-- error action leaves it) and commits. A worker that held the row
		-- from the start of its batch would make that INSERT wait.
		h.write_file(dir .. "/pbal.lua", PBAL:gsub("Inc = function%(s, e, ctx%)", [[Inc = function(s, e, ctx)
			if e.stream == "pacct-race" and e.version == 1 then ctx:query("SELECT pg_sleep(1)") end]]))
		for i = 1, 3 do h.run({ "append", "pacct-race", "Inc", "--db", dsn }) end
		for i = 1, 3 do h.run({ "append", "pacct-other", "Inc", "--db", dsn }) end
		local host = h.spawn({ "run", "--once", "--workers", "1", "--db", dsn, dir })
		h.wait_until(function()
			return scalar(conn, [[SELECT count(*) FROM pg_stat_activity
				WHERE application_name = 'projhost worker' AND query LIKE 'SELECT pg_sleep%']]) == "1"
		end, 30, "the handler to sleep")
		assert(conn:exec("SET lock_timeout = '200ms'"))
		local ok, err = conn:exec([[INSERT INTO projhost.checkpoints (projection, partition, version)
			VALUES ('pbal', 'pacct-race', 1) ON CONFLICT DO NOTHING]])
		assert(conn:exec("RESET lock_timeout"))
		assert.is_truthy(ok, err)
		assert.equal(0, host:wait(60), host:output())
		-- the batch that lost the row rolled back whole and ran again: each
		-- event applied once, no error charged to anything
		assert_matches_truth(conn)
		assert.equal(6, applied(conn))
		assert.not_matches("rolled back", host:output(), 1, true)
		assert.not_matches("failed", host:output(), 1, true)
	end)

	it("commits a job of several partitions without waiting for the WAL flush, unless it emits", function()
		-- each event records the synchronous_commit its job ran with
		h.write_file(dir .. "/psc.lua", [=[
return {
	name = "psc",
	from = { category = "psc" },
	partition = "stream",
	setup = "CREATE TABLE IF NOT EXISTS psc (stream text, version bigint, sync text, PRIMARY KEY (stream, version))",
	when = {
		["*"] = function(_, e, ctx)
			if e.type == "Emit" then ctx:emit("pscout-1", "Out", {}) end
			ctx:exec("INSERT INTO psc SELECT $1, $2, current_setting('synchronous_commit')", e.stream, e.version)
		end,
	},
}
]=])
		os.remove(dir .. "/pbal.lua")
		local function run()
			-- the test cluster's own default is off: the host's sessions wait
			local code, out, err = h.run({ "run", "--once", "--db", dsn, dir },
				{ env = { PGOPTIONS = "-c synchronous_commit=on" } })
			assert.equal(0, code, out .. err)
		end
		local function got(where)
			local out = {}
			for _, r in ipairs(assert(conn:query("SELECT stream || '@' || version || '=' || sync AS s FROM psc WHERE "
				.. where .. " ORDER BY stream, version"))) do
				out[#out + 1] = r.s
			end
			return table.concat(out, " ")
		end
		-- one job over three streams: asynchronous until psc-2 emits
		for _, s in ipairs({ "psc-1", "psc-1", "psc-2", "psc-3" }) do
			assert.equal(0, (h.run({ "append", s, s == "psc-2" and "Emit" or "Inc", "{}", "--db", dsn })))
		end
		run()
		assert.equal("psc-1@1=off psc-1@2=off psc-2@1=on psc-3@1=on", got("true"))
		-- a job of one partition (nearly every live batch) waits
		assert.equal(0, (h.run({ "append", "psc-3", "Inc", "{}", "--db", dsn })))
		run()
		assert.equal("psc-3@2=on", got("version = 2 AND stream = 'psc-3'"))
	end)

	it("takes more than 128 partitions a job, its events still bounded by 128 x the batch", function()
		-- each event records the transaction (= the job) that applied it
		h.write_file(dir .. "/ptx.lua", [=[
return {
	name = "ptx",
	from = { category = "ptx" },
	partition = "stream",
	setup = "CREATE TABLE IF NOT EXISTS ptx (stream text, version bigint, tx xid8, PRIMARY KEY (stream, version))",
	when = {
		["*"] = function(_, e, ctx)
			ctx:exec("INSERT INTO ptx VALUES ($1, $2, pg_current_xact_id())", e.stream, e.version)
		end,
	},
}
]=])
		os.remove(dir .. "/pbal.lua")
		-- 600 streams x 3 events, found by one walk page
		local lines = {}
		for i = 1, 1800 do lines[i] = string.format('{"stream":"ptx-%d","type":"Inc"}', i % 600) end
		local file = h.write_file(h.tmpdir() .. "/e.ndjson", table.concat(lines, "\n"))
		assert.equal(0, (h.run({ "append", "--file", file, "--db", dsn })))
		-- batch 10: a job reads at most 1,280 events, 2 per partition
		-- when it has 600 of them
		local code, out, err = h.run({ "run", "--once", "--workers", "1", "--db", dsn, dir },
			{ env = { PROJHOST_BATCH_SIZE = 10 } })
		assert.equal(0, code, out .. err)
		assert.equal("1800", scalar(conn, "SELECT count(*) FROM ptx"))
		-- every stream's versions in order, each once (the primary key)
		assert.equal("0", scalar(conn, [[SELECT count(*) FROM (SELECT stream, max(version) AS v, count(*) AS n
			FROM ptx GROUP BY stream) s WHERE v <> 3 OR n <> 3]]))
		local big = assert(conn:query([[SELECT count(DISTINCT stream) AS parts, count(*) AS events,
			max(per) AS per FROM (SELECT tx, stream, count(*) OVER (PARTITION BY tx, stream) AS per FROM ptx) x
			GROUP BY tx ORDER BY 1 DESC LIMIT 1]]))[1]
		assert.is_true(tonumber(big.parts) > 128, "partitions in the largest job: " .. big.parts)
		assert.is_true(tonumber(big.events) <= 1280, "events in the largest job: " .. big.events)
		assert.equal("2", big.per)
	end)

	it("rebuilds every partition when the version changes", function()
		h.run({ "append", "pacct-1", "Inc", "--db", dsn })
		h.run({ "append", "pacct-2", "Inc", "--db", dsn })
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		assert.equal(2, applied(conn))
		h.write_file(dir .. "/pbal.lua", PBAL:gsub('partition = "stream",',
			'partition = "stream", version = 2, reset = { "TRUNCATE pcount", "TRUNCATE papplied" },'))
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		assert.matches("version 1 -> 2", err, 1, true)
		assert.equal(2, applied(conn))
		assert_matches_truth(conn)
	end)
end)
