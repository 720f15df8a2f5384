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
