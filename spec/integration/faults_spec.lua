-- Database faults on a real PostgreSQL lose nothing and repeat nothing: the
-- server restarted under load, the worker's backend terminated mid-batch,
-- a handler statement cancelled by statement_timeout.
local h = require "helpers"
local scalar, pgbin = h.scalar, h.pgbin
local core = require "projhost.core"

local function count_lines(text, pattern)
	local n = 0
	for line in text:gmatch("[^\n]+") do
		if line:find(pattern) then n = n + 1 end
	end
	return n
end

-- An unpartitioned tally over category `fault` (name, tables and handler
-- body filled in below): a per-stream count, a running total in the state,
-- and one row per applied event under a unique key, so an event applied
-- twice fails loudly instead of counting twice.
local function tally(name, opts)
	opts = opts or {}
	return (([[
return {
	name = "NAME",
	from = { category = "fault" },
	PARTITION
	setup = {
		"CREATE TABLE IF NOT EXISTS NAME (stream text PRIMARY KEY, n bigint NOT NULL)",
		"CREATE TABLE IF NOT EXISTS NAME_applied (position bigint PRIMARY KEY)",
	},
	reset = { "TRUNCATE NAME", "TRUNCATE NAME_applied" },
	init = function() return { total = 0 } end,
	when = {
		["*"] = function(s, e, ctx)
			EXTRA
			s.total = s.total + 1
			ctx:exec("INSERT INTO NAME VALUES ($1, 1) ON CONFLICT (stream) DO UPDATE SET n = NAME.n + 1", e.stream)
			ctx:exec("INSERT INTO NAME_applied VALUES ($1)", e.position)
		end,
	},
	ON_ERROR
}
]]):gsub("PARTITION", opts.partition and 'partition = "stream",' or "")
		:gsub("EXTRA", opts.extra or "")
		:gsub("ON_ERROR", opts.on_error or "")
		:gsub("NAME", name))
end

-- Every `fault-*` event applied by projection `name`?
local function caught_up(conn, name)
	local rows = conn:query(([[SELECT count(*) AS n FROM projhost.events e
		WHERE stream_id LIKE 'fault-%%' AND NOT EXISTS
		(SELECT 1 FROM %s_applied a WHERE a.position = e.global_position)]]):format(name))
	return rows and rows[1].n == "0"
end

-- The read model equals the ground truth; each event applied exactly once.
local function assert_matches_truth(conn, name, partitioned)
	local truth = assert(conn:query([[SELECT stream_id AS stream, count(*)::text AS n
		FROM projhost.events WHERE stream_id LIKE 'fault-%' GROUP BY 1 ORDER BY 1]]))
	local model = assert(conn:query(("SELECT stream, n::text AS n FROM %s ORDER BY 1"):format(name)))
	assert.equal(#truth, #model)
	assert.same(truth, model)
	local events = scalar(conn, "SELECT count(*) FROM projhost.events WHERE stream_id LIKE 'fault-%'")
	assert.equal(events, scalar(conn, ("SELECT count(*) FROM %s_applied"):format(name)))
	-- the state (running total) committed with the effects
	local states = partitioned
		and scalar(conn, [[SELECT coalesce(sum((state->>'total')::bigint), 0) FROM projhost.checkpoints
			WHERE projection = $1 AND partition <> '']], name)
		or scalar(conn, [[SELECT state->>'total' FROM projhost.checkpoints
			WHERE projection = $1 AND partition = '']], name)
	assert.equal(events, states)
end

local function db(cmd)
	local code, out, err = h.run({ "db", cmd }, { env = {
		PROJHOST_HOME = h.pg().home,
		PROJHOST_PG_OPTS = h.PG_OPTS,
	} })
	assert.equal(0, code, "projhost db " .. cmd .. ": " .. out .. err)
end

describe("database faults", function()
	local dsn, conn, dir, host

	before_each(function()
		dsn = h.fresh_db("faults")
		conn = h.connect(dsn)
		dir = h.tmpdir()
	end)

	after_each(function()
		if conn then conn:close() end
		-- a host left over from a failed spec must not reach the next database
		if host and host:alive() then
			host:kill(9)
			host:wait(10)
		end
		host = nil
	end)

	it("lose nothing and repeat nothing when the server restarts under load", function()
		h.write_file(dir .. "/ftally.lua", tally("ftally"))
		h.write_file(dir .. "/fpart.lua", tally("fpart", { partition = true }))
		-- the fallback poll is 10 minutes away: after the restart only the
		-- LISTEN connection (and the host's own retries) can wake it
		host = h.spawn({ "run", "--workers", "2", "--db", dsn, dir }, { env = { PROJHOST_POLL_INTERVAL = 600 } })
		h.wait_until(function() return host:output():find("serving 2 projections", 1, true) end, 20, "start-up")
		h.wait_until(function() return caught_up(conn, "ftally") and caught_up(conn, "fpart") end, 20, "the setup")

		-- 4 writers for about 8 s; pgbench gives up on a lost connection, so
		-- a shell loop starts it again until the deadline
		local script = h.write_file(h.tmpdir() .. "/writer.sql", [[
\set s random(1, 40)
SELECT projhost.append('fault-' || :s, NULL, '[{"type":"Inc"}]');
]])
		local writers = io.popen(string.format([[
end=$(( $(date +%%s) + 8 ))
while [ "$(date +%%s)" -lt "$end" ]; do
	%s -n -c 4 -j 2 -T 2 -f %s '%s' >/dev/null 2>&1 || sleep 0.2
done
echo done]], pgbin("pgbench"), script, dsn))

		h.wait_until(function()
			return tonumber(scalar(conn, "SELECT count(*) FROM projhost.events")) >= 500
		end, 10, "the writers to get going")
		conn:close()
		conn = nil
		-- the cluster is shared by every spec of this process: start it again
		-- whatever happens below
		finally(function() db("start") end)
		db("stop")
		core.sleep(1) -- the host notices: its LISTEN and worker connections are gone
		local alive = host:alive()
		db("start")
		assert.is_true(alive, "exit code " .. tostring(host.code) .. "\n" .. host:output())
		conn = h.connect(dsn)
		local at_restart = tonumber(scalar(conn, "SELECT count(*) FROM projhost.events"))
		h.wait_until(function() return host:output():find("reachable again %b(); listening") end, 15,
			"the host to LISTEN again")
		assert.equal("done", writers:read("*a"):match("done"))
		writers:close()
		local total = tonumber(scalar(conn, "SELECT count(*) FROM projhost.events"))
		assert.is_true(total > at_restart, ("writers went on after the restart: %d, then %d"):format(at_restart, total))

		h.wait_until(function() return caught_up(conn, "ftally") and caught_up(conn, "fpart") end, 30,
			"the host to apply every event")
		-- live again: a NOTIFY wakes it
		assert.equal(0, (h.run({ "append", "fault-live", "Inc", "{}", "--db", dsn })))
		h.wait_until(function() return caught_up(conn, "ftally") and caught_up(conn, "fpart") end, 10,
			"a live event after the restart")
		assert_matches_truth(conn, "ftally", false)
		assert_matches_truth(conn, "fpart", true)
		-- the outage was nobody's event's fault: nothing charged, parked or failed
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.parked"))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status <> 'running'"))
		local out = host:output()
		assert.not_matches("failed %(attempt", out)
		assert.not_matches("internal error", out)

		assert.is_true(host:alive(), out)
		-- one outage: a line per process (master, 2 workers), not one per attempt
		local outage = count_lines(out, "unreachable") + count_lines(out, "lost")
		assert.is_true(outage >= 1 and outage <= 6, out)
		host:kill(15)
		assert.equal(0, host:wait(10), host:output())
	end)

	it("lose nothing and repeat nothing when PostgreSQL crashes in the middle of a catch-up", function()
		-- batches in the middle of a catch-up commit without waiting for
		-- their WAL flush, and an immediate shutdown (SIGQUIT: no
		-- checkpoint) loses what was not flushed: each batch must be
		-- lost whole - effects, state and checkpoint - and applied again
		h.write_file(dir .. "/ftally.lua", tally("ftally", { extra = 'ctx:exec("SELECT pg_sleep(0.0002)")' }))
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		h.insert_events(conn, "fault", 8000, 40)
		host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 50, PROJHOST_POLL_INTERVAL = 600 } })
		h.wait_until(function()
			return tonumber(scalar(conn, "SELECT count(*) FROM ftally_applied")) >= 1500
		end, 30, "the catch-up to get going")
		conn:close()
		conn = nil
		finally(function() db("start") end)
		local pidfile = h.pg().home .. "/data/postmaster.pid"
		local pm = tonumber(h.read_file(pidfile):match("^(%d+)"))
		assert(core.kill(pm, 3))
		h.wait_until(function() return not core.kill(pm, 0) end, 30, "the crash")
		db("start")
		conn = h.connect(dsn)
		-- the crash really came in the middle
		assert.is_true(tonumber(scalar(conn, "SELECT count(*) FROM ftally_applied")) < 8000)
		h.wait_until(function() return caught_up(conn, "ftally") end, 60, "the host to apply every event")
		assert_matches_truth(conn, "ftally", false)
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.parked"))
		assert.is_true(host:alive(), host:output())
		assert.not_matches("failed %(attempt", host:output())
	end)

	it("roll back and redo the batch when the worker's backend is terminated mid-batch", function()
		-- parks whatever fails: a connection cut under a handler's statement
		-- must not count as the event failing, or the event goes missing
		h.write_file(dir .. "/slowtally.lua", tally("slowtally", {
			extra = 'ctx:exec("SELECT pg_sleep(0.002)")',
			on_error = 'on_error = function(err, e, attempt) return "park" end,',
		}))
		local lines = {}
		for i = 1, 3000 do
			lines[i] = string.format('{"stream":"fault-%d","type":"Inc","data":{"i":%d}}', i % 37, i)
		end
		local file = h.write_file(h.tmpdir() .. "/events.ndjson", table.concat(lines, "\n") .. "\n")
		local code, out, err = h.run({ "append", "--file", file, "--db", dsn })
		assert.equal(0, code, out .. err)

		host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 400 } })
		local function applied()
			local rows = conn:query("SELECT count(*) AS n FROM slowtally_applied")
			return rows and tonumber(rows[1].n) or 0
		end
		local kills = 0
		for k = 1, 4 do
			-- let it get into a batch, then cut the connection under it
			local target = applied() + 150
			h.wait_until(function() return applied() >= target end, 30, target .. " events applied")
			core.sleep(0.1 * k)
			local rows = assert(conn:query([[SELECT pg_terminate_backend(pid)::text AS t FROM pg_stat_activity
				WHERE application_name = 'projhost worker' AND datname = current_database()]]))
			for _, r in ipairs(rows) do
				if r.t == "true" then kills = kills + 1 end
			end
		end
		assert.is_true(kills >= 4, "terminated " .. kills .. " backends")

		h.wait_until(function()
			return caught_up(conn, "slowtally") or scalar(conn, "SELECT count(*) FROM projhost.parked") ~= "0"
		end, 40, "every event applied")
		local parked = assert(conn:query("SELECT global_position::text AS pos, error FROM projhost.parked"))
		assert.same({}, parked)
		h.wait_until(function() return caught_up(conn, "slowtally") end, 40, "every event applied")
		assert_matches_truth(conn, "slowtally", false)
		assert.equal("3000", scalar(conn, "SELECT count(*) FROM slowtally_applied"))
		assert.equal("running", scalar(conn, "SELECT status FROM projhost.checkpoints WHERE projection = 'slowtally'"))
		assert.is_true(host:alive(), host:output())
		out = host:output()
		assert.matches("rolled back", out, 1, true)
		assert.not_matches("failed %(attempt", out)
		host:kill(15)
		assert.equal(0, host:wait(10), host:output())
	end)

	it("park an event whose statement hits statement_timeout and apply the next", function()
		h.write_file(dir .. "/timeouts.lua", tally("timeouts", {
			extra = 'if e.type == "Slow" then ctx:exec("SELECT pg_sleep(5)") end',
			on_error = 'on_error = function(err, e, attempt) return "park" end,',
		}))
		assert.equal(0, (h.run({ "append", "fault-1", "Slow", "{}", "--db", dsn })))
		assert.equal(0, (h.run({ "append", "fault-1", "Inc", "{}", "--db", dsn })))
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir },
			{ env = { PROJHOST_STATEMENT_TIMEOUT = "200ms" }, timeout = 30 })
		assert.equal(0, code, out .. err)
		local parked = assert(conn:query([[SELECT stream_id, stream_version::text AS v, event_type, error
			FROM projhost.parked WHERE projection = 'timeouts']]))
		assert.equal(1, #parked)
		assert.equal("fault-1", parked[1].stream_id)
		assert.equal("1", parked[1].v)
		assert.equal("Slow", parked[1].event_type)
		assert.matches("canceling statement due to statement timeout", parked[1].error, 1, true)
		-- the parked event left no trace; the next one was applied once
		assert.same({ { stream = "fault-1", n = "1" } },
			assert(conn:query("SELECT stream, n::text AS n FROM timeouts")))
		assert.equal("2", scalar(conn, "SELECT position::text FROM timeouts_applied"))
		assert.equal("1", scalar(conn, "SELECT state->>'total' FROM projhost.checkpoints WHERE projection = 'timeouts'"))
		assert.equal("2", scalar(conn, "SELECT last_pos FROM projhost.checkpoints WHERE projection = 'timeouts'"))
	end)
end)
