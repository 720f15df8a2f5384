-- projhost run against a real PostgreSQL: catch-up, live, gap-free order
-- under out-of-order commits, exactly once across SIGKILLs, bad files.
local h = require "helpers"
local scalar, pgbin = h.scalar, h.pgbin
local core = require "projhost.core"

-- Unpartitioned projection over category `acct`: a per-stream count in a
-- table, a running total in its state, and one row per applied event in a
-- table with a unique key, so an event applied twice fails loudly.
local TALLY = [[
return {
	name = "tally",
	from = { category = "acct" },
	setup = {
		"CREATE TABLE IF NOT EXISTS tally (stream text PRIMARY KEY, n bigint NOT NULL)",
		"CREATE TABLE IF NOT EXISTS tally_applied (position bigint PRIMARY KEY)",
	},
	reset = { "TRUNCATE tally", "TRUNCATE tally_applied" },
	init = function() return { total = 0 } end,
	when = {
		["*"] = function(s, e, ctx)
			s.total = s.total + 1
			ctx:exec("INSERT INTO tally VALUES ($1, 1) ON CONFLICT (stream) DO UPDATE SET n = tally.n + 1", e.stream)
			ctx:exec("INSERT INTO tally_applied VALUES ($1)", e.position)
		end,
	},
}
]]

-- The read model must equal the ground truth exactly.
local function assert_matches_truth(conn)
	local truth = assert(conn:query([[SELECT stream_id AS stream, count(*)::text AS n
		FROM projhost.events WHERE stream_id LIKE 'acct-%' GROUP BY 1 ORDER BY 1]]))
	local model = assert(conn:query("SELECT stream, n::text AS n FROM tally ORDER BY 1"))
	assert.same(truth, model)
	local events = scalar(conn, "SELECT count(*) FROM projhost.events WHERE stream_id LIKE 'acct-%'")
	assert.equal(events, scalar(conn, "SELECT count(*) FROM tally_applied"))
	assert.equal(events, scalar(conn, [[SELECT state->>'total' FROM projhost.checkpoints
		WHERE projection = 'tally' AND partition = '']]))
end

local function caught_up(conn)
	return function()
		-- tally_applied appears once a host has run the setup
		local rows = conn:query([[SELECT count(*) AS n FROM projhost.events e
			WHERE stream_id LIKE 'acct-%' AND NOT EXISTS
			(SELECT 1 FROM tally_applied a WHERE a.position = e.global_position)]])
		return rows and rows[1].n == "0"
	end
end

describe("projhost run", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("run")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		h.write_file(dir .. "/tally.lua", TALLY)
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("catches up with --once, exits 0, and commits state, checkpoint and effects together", function()
		local code, out, err = h.run({ "append", "acct-1", "Inc", "{}", "--db", dsn })
		assert.equal(0, code, err)
		h.run({ "append", "acct-2", "Inc", "{}", "--db", dsn })
		h.run({ "append", "acct-1", "Inc", "{}", "--db", dsn })
		code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		assert.matches("tally pos=3 caught up", err .. out, 1, true)
		assert_matches_truth(conn)
		assert.equal("3", scalar(conn, "SELECT last_pos FROM projhost.checkpoints WHERE projection = 'tally'"))
		-- run again: nothing is applied twice
		code = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(0, code)
		assert_matches_truth(conn)
	end)

	it("hands handlers every field of an event, also from pages read ahead and kept in the state", function()
		-- batches of 2 over 7 events: most pages are read ahead by the
		-- batch before them; the state keeps the last event seen
		h.write_file(dir .. "/fields.lua", [=[
return {
	name = "fields",
	from = { category = "fld" },
	setup = [[CREATE TABLE IF NOT EXISTS fields (position bigint PRIMARY KEY, version bigint,
		stream text, type text, id text, time text, amount int, corr text)]],
	init = function() return {} end,
	when = {
		["*"] = function(s, e, ctx)
			ctx:exec("INSERT INTO fields VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", e.position, e.version,
				e.stream, e.type, e.id, e.time, e.data.amount, e.metadata.corr)
			s.last = e
		end,
	},
}
]=])
		for i = 1, 7 do
			local code, _, err = h.run({ "append", "fld-" .. (i % 2), "Seen" .. i, ('{"amount": %d}'):format(i),
				"--metadata", ('{"corr": "c%d"}'):format(i), "--db", dsn })
			assert.equal(0, code, err)
		end
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 2 } })
		assert.equal(0, code, out .. err)
		assert(conn:exec("SET TimeZone = 'UTC'"))
		local truth = assert(conn:query([[SELECT global_position::text AS position, stream_version::text AS version,
			stream_id AS stream, event_type AS type, event_id::text AS id,
			replace(replace(created_at::text, ' ', 'T'), '+00', 'Z') AS time, (data->>'amount') AS amount,
			metadata->>'corr' AS corr
			FROM projhost.events WHERE stream_id LIKE 'fld-%' ORDER BY global_position]]))
		assert.equal(7, #truth)
		local seen = assert(conn:query([[SELECT position::text AS position, version::text AS version, stream, type, id,
			time, amount::text AS amount, corr FROM fields ORDER BY position]]))
		assert.same(truth, seen)
		-- the event kept in the state is stored with its fields
		local last = assert(conn:query([[SELECT state->'last' AS e FROM projhost.checkpoints
			WHERE projection = 'fields']]))[1].e
		local e = require("cjson").decode(last)
		local t = truth[7]
		assert.same({ t.id, tonumber(t.position), tonumber(t.version), t.stream, t.type, t.time, 7, "c7" },
			{ e.id, e.position, e.version, e.stream, e.type, e.time, e.data.amount, e.metadata.corr })
	end)

	it("commits full pages without waiting for the WAL flush, unless they emit or catch up", function()
		-- each event records the synchronous_commit its batch ran with
		local SC = [=[
return {
	name = "NAME",
	from = { category = "sc" },
	setup = "CREATE TABLE IF NOT EXISTS NAME (position bigint PRIMARY KEY, sync text)",
	when = {
		["*"] = function(_, e, ctx)
			if e.type == "Emit" then ctx:emit("scout-1", "Out", {}) end
			ctx:exec("INSERT INTO NAME SELECT $1, current_setting('synchronous_commit')", e.position)
		end,
	},
}
]=]
		for i = 1, 25 do
			local code, _, err = h.run({ "append", "sc-1", i == 15 and "Emit" or "Inc", "{}", "--db", dsn })
			assert.equal(0, code, err)
		end
		local function run(name, env)
			local d = h.tmpdir()
			h.write_file(d .. "/" .. name .. ".lua", (SC:gsub("NAME", name)))
			-- the test cluster's own default is off: the host's sessions wait
			env.PGOPTIONS, env.PROJHOST_BATCH_SIZE = "-c synchronous_commit=on", 10
			local code, out, err = h.run({ "run", "--once", "--db", dsn, d }, { env = env })
			assert.equal(0, code, out .. err)
			local got = {}
			for _, r in ipairs(assert(conn:query("SELECT sync FROM " .. name .. " ORDER BY position"))) do
				got[#got + 1] = r.sync
			end
			return table.concat(got, " ")
		end
		-- batches 1-10 and 11-20 are full pages; 15 emits; 21-25 catch up
		local expect = ("off "):rep(14) .. ("on "):rep(11)
		assert.equal(expect:sub(1, -2), run("sc_async", {}))
		assert.equal(("on "):rep(25):sub(1, -2), run("sc_sync", { PROJHOST_SYNCHRONOUS_COMMIT = "on" }))
	end)

	it("gives a projection with a large state larger batches, one transaction each", function()
		-- each event records the transaction that applied it; the state
		-- grows to ~30 KB of JSON (one event per 16 bytes: 2,000 a batch)
		h.write_file(dir .. "/big.lua", [=[
return {
	name = "big",
	from = { category = "big" },
	setup = "CREATE TABLE IF NOT EXISTS big (position bigint PRIMARY KEY, tx xid8 NOT NULL)",
	init = function() return { keys = {} } end,
	when = {
		["*"] = function(s, e, ctx)
			s.keys["key-" .. (e.position % 2000)] = e.position
			ctx:exec("INSERT INTO big VALUES ($1, pg_current_xact_id())", e.position)
		end,
	},
}
]=])
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			SELECT 'big-1', i, 'Inc', '{}' FROM generate_series(1, 10000) i]]))
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 1000 } })
		assert.equal(0, code, out .. err)
		local sizes = {}
		for _, r in ipairs(assert(conn:query("SELECT count(*) AS n FROM big GROUP BY tx ORDER BY min(position)"))) do
			sizes[#sizes + 1] = tonumber(r.n)
		end
		-- the first batches have the configured size; once the state is
		-- ~30 KB they grow (multiples of the configured size, at most 16x)
		local total, grew = 0, false
		for i, n in ipairs(sizes) do
			total = total + n
			if i < #sizes then assert.equal(0, n % 1000, table.concat(sizes, " ")) end
			assert.is_true(n <= 16000)
			grew = grew or n > 1000
		end
		assert.equal(10000, total)
		assert.equal(1000, sizes[1])
		assert.is_true(grew, table.concat(sizes, " "))
		assert.is_true(#sizes < 10, table.concat(sizes, " "))
	end)

	it("stays live on LISTEN/NOTIFY and stops cleanly on SIGTERM", function()
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_POLL_INTERVAL = 600 } })
		h.wait_until(function() return host:output():find("serving 1 projection", 1, true) end, 20, "start-up")
		-- the fallback poll is 10 minutes away: only the NOTIFY can wake it
		assert.equal(0, (h.run({ "append", "acct-9", "Inc", "{}", "--db", dsn })))
		h.wait_until(caught_up(conn), 10, "the live event to be applied")
		assert_matches_truth(conn)
		host:kill(15)
		assert.equal(0, host:wait(10), host:output())
		assert.matches("SIGTERM", host:output(), 1, true)
	end)

	it("finishes the batch in flight on SIGINT and loads changed files on SIGHUP", function()
		h.run({ "append", "acct-1", "Inc", "{}", "--db", dsn })
		local host = h.spawn({ "run", "--db", dsn, dir })
		h.wait_until(caught_up(conn), 20, "the first event")
		-- a new handler: counts by 10 from now on
		h.write_file(dir .. "/tally.lua", (TALLY:gsub("s.total = s.total %+ 1", "s.total = s.total + 10")))
		core.kill(host.pid, 1)
		h.wait_until(function() return host:output():find("SIGHUP: reloading", 1, true) end, 10, "the reload")
		h.wait_until(function() return host:output():find("tally reloaded (hash ", 1, true) end, 10,
			"the new code")
		h.run({ "append", "acct-1", "Inc", "{}", "--db", dsn })
		h.wait_until(caught_up(conn), 20, "the second event")
		assert.equal("11", scalar(conn, "SELECT state->>'total' FROM projhost.checkpoints WHERE projection = 'tally'"))
		core.kill(host.pid, 2)
		assert.equal(0, host:wait(10), host:output())
		assert.matches("SIGINT: stopping", host:output(), 1, true)
	end)

	it("reads in gap-free order while concurrent writers commit out of order (two instances)", function()
		-- create the schema and tables first
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		local a = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 7 } })
		local b = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 7 } })
		local script = h.write_file(h.tmpdir() .. "/writer.sql", [[
\set s random(1, 25)
BEGIN;
SELECT projhost.append('acct-' || :s, NULL, '[{"type":"Inc","data":{"n":1}},{"type":"Inc","data":{"n":2}}]');
SELECT pg_sleep(random() * 0.03);
COMMIT;
]])
		-- 8 writers x 60 transactions; each sleeps a random time between
		-- taking its positions and committing, so positions commit out of order
		local cmd = string.format("%s -n -c 8 -j 2 -t 60 -f %s '%s' >/dev/null 2>&1",
			pgbin("pgbench"), script, dsn)
		assert.is_true(os.execute(cmd) == 0 or os.execute(cmd) == true)
		local n = tonumber(scalar(conn, "SELECT count(*) FROM projhost.events WHERE stream_id LIKE 'acct-%'"))
		assert.is_true(n >= 960, "writers appended " .. n)
		h.wait_until(caught_up(conn), 60, "both hosts to apply every event")
		assert_matches_truth(conn)
		a:kill(15)
		b:kill(15)
		assert.equal(0, a:wait(10), a:output())
		assert.equal(0, b:wait(10), b:output())
		assert.not_matches("ERROR", a:output() .. b:output())
	end)

	it("applies every event exactly once when two instances race through one backlog", function()
		-- every page is full, so each batch reads the next page ahead
		-- while both instances compete for the checkpoint row (the stale
		-- page case, made deterministic, is the spec after this one)
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			SELECT 'acct-' || (i % 40), i / 40 + 1, 'Inc', '{}' FROM generate_series(0, 5999) i]]))
		local a = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 7 } })
		local b = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 7 } })
		h.wait_until(caught_up(conn), 60, "both instances to catch up")
		assert_matches_truth(conn)
		-- nothing was applied twice and then rolled back either
		for _, host in ipairs({ a, b }) do
			assert.not_matches("duplicate key", host:output(), 1, true)
		end
	end)

	it("reads afresh when another instance moved the checkpoint after a page was read ahead", function()
		-- Deterministic: this process is one worker (projhost.worker, driven
		-- the way the master drives it) and `run --once` is another
		-- instance, run between two of its batches.
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		h.insert_events(conn, "acct", 40, 4)
		local ffi = require "ffi"
		pcall(ffi.cdef, "int setenv(const char *, const char *, int); int unsetenv(const char *);")
		ffi.C.setenv("PROJHOST_BATCH_SIZE", "10", 1)
		package.loaded["projhost.worker"] = nil
		local W = require "projhost.worker"
		finally(function()
			W.handle("quit")
			package.loaded["projhost.worker"] = nil
			ffi.C.unsetenv("PROJHOST_BATCH_SIZE")
		end)
		W.handle("init\t" .. dsn .. "\t" .. dir)
		-- events 1-10; 11-20 are read ahead
		assert.equal("done\ttally\t10\npart\t\tmore\t0.000", W.handle("job\ttally\t"))
		-- the other instance applies 11-40
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		-- the page read ahead is stale now: nothing is left to apply
		assert.equal("done\ttally\t0\npart\t\tidle\t0.000", W.handle("job\ttally\t"))
		assert_matches_truth(conn)
	end)

	it("applies every event exactly once across repeated SIGKILLs during catch-up", function()
		local lines = {}
		for i = 1, 30000 do
			lines[i] = string.format('{"stream":"acct-%d","type":"Inc","data":{"i":%d}}', i % 97, i)
		end
		local file = h.write_file(h.tmpdir() .. "/events.ndjson", table.concat(lines, "\n") .. "\n")
		local code, _, err = h.run({ "append", "--file", file, "--db", dsn })
		assert.equal(0, code, err)
		local env = { PROJHOST_BATCH_SIZE = 250 }
		-- a second instance runs throughout and takes over while the first is dead
		local steady = h.spawn({ "run", "--db", dsn, dir }, { env = env })
		for k = 1, 4 do
			local host = h.spawn({ "run", "--db", dsn, dir }, { env = env })
			local target = k * 5000
			h.wait_until(function()
				-- the table appears when a host has run the setup
				local rows = conn:query("SELECT count(*) AS n FROM tally_applied")
				return rows and tonumber(rows[1].n) >= target
			end, 60, target .. " events applied")
			core.kill(host.pid, 9)
			host:wait(10)
		end
		h.wait_until(caught_up(conn), 60, "every event applied")
		steady:kill(15)
		assert.equal(0, steady:wait(10), steady:output())
		code = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(0, code)
		assert_matches_truth(conn)
		assert.equal("30000", scalar(conn, "SELECT count(*) FROM tally_applied"))
	end)

	it("waits for an unreachable database with one clear line, retrying with backoff", function()
		local host = h.spawn({ "run", "--db", "host=127.0.0.1 port=1 connect_timeout=2", dir })
		h.wait_until(function() return host:output():find("unreachable", 1, true) end, 10, "the error line")
		core.sleep(2)
		assert.is_true(host:alive(), host:output())
		local out = host:output()
		local _, lines = out:gsub("unreachable", "")
		assert.equal(1, lines, out) -- once per outage, not per attempt
		assert.matches("127%.0%.0%.1", out)
		assert.matches("port 1", out, 1, true)
		host:kill(15)
		host:wait(10)
		-- --once does not wait: it reports and exits 1
		local code, _, err = h.run({ "run", "--once", "--db", "host=127.0.0.1 port=1", dir })
		assert.equal(1, code)
		assert.matches("127%.0%.0%.1", err)
	end)

	it("reports a broken projection with file:line and runs the others", function()
		h.write_file(dir .. "/broken.lua", "return {\n  name = 'broken',\n  when = {\n}\n")
		h.run({ "append", "acct-1", "Inc", "{}", "--db", dsn })
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(1, code)
		assert.matches("broken.lua:%d+:", err .. out)
		assert_matches_truth(conn)
	end)
end)
