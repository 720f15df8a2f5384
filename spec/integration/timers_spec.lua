-- Durable timers (issue 14, section 2): ctx:schedule records a timer in the
-- batch's transaction (rolled back with it); when due it is delivered to
-- its projection and partition like an event (e.timer, e.type, e.data,
-- e.time = the due time, e.key), in the partition's order, by a batch that
-- also deletes it, so it fires once across crashes and instances; keys
-- replace and cancel; every = SECONDS + tick runs an unpartitioned
-- projection's tick once per interval. Fired timers are rows of a plain
-- table (no unique key: a timer fired twice shows as two rows).
local h = require "helpers"
local scalar = h.scalar

local function ins(conn, stream, etype, data)
	assert(conn:query("SELECT projhost.append($1, NULL, jsonb_build_array(jsonb_build_object('type', $2::text, "
		.. "'data', $3::jsonb)))", stream, etype, require("projhost.json").encode(data or {})))
end

-- pm: Start schedules Deadline (data.delay or data.at, data.key, data.n);
-- Many schedules data.k unkeyed timers due within a second; Cancel
-- cancels data.key; Boom schedules and then fails (on_error skips it);
-- Deadline records what it got; Hang's first run (pm_hang_seq) loops
-- after its statements went out, until the spec SIGKILLs the host.
local PM = [[
return {
	name = "pm",
	partition = "stream",
	from = { category = "pm" },
	options = { budget = 60 },
	setup = {
		[=[CREATE TABLE IF NOT EXISTS pm_log (seq bigserial, stream text, what text, n int, key text,
			timer boolean, etime text, position bigint, version bigint)]=],
		"CREATE SEQUENCE IF NOT EXISTS pm_hang_seq",
	},
	reset = "TRUNCATE pm_log",
	when = {
		Start = function(s, e, ctx)
			ctx:exec("INSERT INTO pm_log (stream, what) VALUES ($1, 'Start')", e.stream)
			local opts = { key = e.data.key }
			if e.data.at then opts.at = e.data.at end
			ctx:schedule(not e.data.at and (e.data.delay or 0) or nil, e.data.type or "Deadline",
				{ n = e.data.n }, opts)
		end,
		Many = function(s, e, ctx)
			for i = 1, e.data.k do ctx:schedule((i % 5) * 0.2, "Deadline", { n = i }) end
		end,
		Cancel = function(s, e, ctx) ctx:cancel(e.data.key) end,
		Boom = function(s, e, ctx)
			ctx:schedule(0, "Deadline", { n = 666 }, { key = "boom" })
			error("boom")
		end,
		Before = function(s, e, ctx) ctx:exec("INSERT INTO pm_log (stream, what) VALUES ($1, 'Before')", e.stream) end,
		After = function(s, e, ctx) ctx:exec("INSERT INTO pm_log (stream, what) VALUES ($1, 'After')", e.stream) end,
		Deadline = function(s, e, ctx)
			s.fired = (s.fired or 0) + 1
			ctx:exec([=[INSERT INTO pm_log (stream, what, n, key, timer, etime, position, version)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8)]=], e.stream, e.type, e.data.n, e.key, e.timer, e.time,
				e.position, e.version)
		end,
		Finish = function(s, e, ctx)
			ctx:exec("INSERT INTO pm_log (stream, what) VALUES ($1, 'Finish')", e.stream)
			ctx:done()
		end,
		Hang = function(s, e, ctx)
			ctx:exec("INSERT INTO pm_log (stream, what) VALUES ($1, 'Hang')", e.stream)
			if ctx:query("SELECT nextval('pm_hang_seq') AS v")[1].v == "1" then
				while true do end
			end
		end,
	},
	on_error = function() return "skip" end,
}
]]

-- uni: unpartitioned; Go schedules Ping (with a key: Go again replaces it)
local UNI = [[
return {
	name = "uni",
	from = { category = "u" },
	setup = "CREATE TABLE IF NOT EXISTS uni_log (seq bigserial, what text, n int, timer boolean, etime text)",
	when = {
		Go = function(s, e, ctx) ctx:schedule(e.data.delay, "Ping", { n = e.data.n }, { key = "ping" }) end,
		Ping = function(s, e, ctx)
			ctx:exec("INSERT INTO uni_log (what, n, timer, etime) VALUES ($1, $2, $3, $4)", e.type, e.data.n,
				e.timer, e.time)
		end,
	},
}
]]

-- cron: a tick every second, each recorded with the time it was due
local CRON = [[
return {
	name = "cron",
	from = { category = "cron" },
	setup = "CREATE TABLE IF NOT EXISTS cron_ticks (seq bigserial, at double precision, n int)",
	every = 1,
	init = function() return { n = 0 } end,
	tick = function(s, ctx, now)
		s.n = s.n + 1
		ctx:exec("INSERT INTO cron_ticks (at, n) VALUES ($1, $2)", now, s.n)
	end,
	when = { ["*"] = function() end },
}
]]

-- bad: Arm schedules the timers data.types names, due now. Flaky always
-- fails (retried once, then parked: dropped); Loop's first run loops until
-- the watchdog kills its worker (then retried); Gate fails until bad_fix
-- has a row (on_error fails its partition, keeping the timer).
local BAD = [[
return {
	name = "bad",
	partition = "stream",
	from = { category = "bad" },
	options = { budget = 1 },
	setup = {
		"CREATE TABLE IF NOT EXISTS bad_log (seq bigserial, stream text, what text)",
		"CREATE TABLE IF NOT EXISTS bad_fix (x int)",
		"CREATE SEQUENCE IF NOT EXISTS bad_loop_seq",
		"CREATE SEQUENCE IF NOT EXISTS bad_flaky_seq",
	},
	when = {
		Arm = function(s, e, ctx)
			for _, t in ipairs(e.data.types) do ctx:schedule(0, t, { from = e.version }) end
		end,
		Later = function(s, e, ctx) ctx:exec("INSERT INTO bad_log (stream, what) VALUES ($1, 'Later')", e.stream) end,
		Flaky = function(s, e, ctx)
			ctx:query("SELECT nextval('bad_flaky_seq')")
			error("flaky timer")
		end,
		Loop = function(s, e, ctx)
			if ctx:query("SELECT nextval('bad_loop_seq') AS v")[1].v == "1" then while true do end end
			ctx:exec("INSERT INTO bad_log (stream, what) VALUES ($1, 'Loop')", e.stream)
		end,
		Gate = function(s, e, ctx)
			if ctx:query("SELECT count(*) AS n FROM bad_fix")[1].n == "0" then error("gate closed") end
			ctx:exec("INSERT INTO bad_log (stream, what) VALUES ($1, 'Gate')", e.stream)
		end,
	},
	on_error = function(err, e, attempt)
		if not e.timer then return "skip" end
		if e.type == "Gate" then return "fail" end
		if attempt <= 1 then return "retry", 0 end
		return "park"
	end,
}
]]

local dsn, conn, dir

-- hosts whose fallback poll never comes during a spec: what fires a timer
-- is the master waking the projection at its due time
local NO_POLL = { env = { PROJHOST_POLL_INTERVAL = 600 } }

local function run_once()
	return select(2, h.ok({ "run", "--once", dir }, dsn, { timeout = 60 }))
end

local function log_of(stream)
	local out = {}
	for _, r in ipairs(assert(conn:query("SELECT what, n FROM pm_log WHERE stream = $1 ORDER BY seq", stream))) do
		out[#out + 1] = r.what .. (r.n and (":" .. r.n) or "")
	end
	return out
end

-- (-1 while the host has not made the table yet)
local function count(sql, ...)
	local rows = conn:query(sql, ...)
	if not rows then return -1 end
	local _, v = next(rows[1] or {})
	return tonumber(v)
end

describe("durable timers", function()
	before_each(function()
		dsn, conn, dir = h.projection_db("timers", { ["pm.lua"] = PM, ["uni.lua"] = UNI })
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("fires a partition's timer as an event after the events before its due time, before later ones", function()
		local at = tonumber(scalar(conn, "SELECT extract(epoch FROM now())")) + 3600
		ins(conn, "pm-1", "Start", { at = at, key = "k", n = 1 })
		run_once()
		assert.equal(1, count("SELECT count(*) FROM projhost.timers WHERE projection = 'pm'"))
		assert.equal("t", scalar(conn, "SELECT abs(extract(epoch FROM due) - $1) < 0.001 FROM projhost.timers", at))
		-- due between two events (moved here rather than waited for)
		ins(conn, "pm-1", "Before")
		at = tonumber(scalar(conn, [[UPDATE projhost.timers SET due = clock_timestamp()
			RETURNING extract(epoch FROM due)]]))
		ins(conn, "pm-1", "After")
		run_once()
		assert.same({ "Start", "Before", "Deadline:1", "After" }, log_of("pm-1"))
		local r = assert(conn:query("SELECT * FROM pm_log WHERE what = 'Deadline'"))[1]
		assert.same({ "k", "t" }, { r.key, r.timer })
		-- no stream position; its time is the due time, written as events' times are
		assert.is_nil(r.position)
		assert.is_nil(r.version)
		assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d[.%d]*Z$", r.etime)
		assert.equal("t", scalar(conn, "SELECT abs(extract(epoch FROM $1::timestamptz) - $2) < 0.001", r.etime, at))
		assert.equal(0, count("SELECT count(*) FROM projhost.timers"))
		-- not an event of the store
		assert.equal(0, count("SELECT count(*) FROM projhost.events WHERE event_type = 'Deadline'"))
	end)

	it("replaces a timer by key, cancels by key, fires at= and unpartitioned timers, and drops a failed batch's",
		function()
		local host = h.spawn({ "run", "--db", dsn, dir }, NO_POLL)
		local now = tonumber(scalar(conn, "SELECT extract(epoch FROM now())"))
		ins(conn, "pm-2", "Start", { delay = 3600, key = "r", n = 1 })
		ins(conn, "pm-2", "Start", { delay = 0.3, key = "r", n = 2 })
		ins(conn, "pm-3", "Start", { delay = 0.5, key = "c", n = 3 })
		ins(conn, "pm-3", "Cancel", { key = "c" })
		ins(conn, "pm-4", "Start", { at = now - 10, n = 4 })
		ins(conn, "pm-5", "Boom")
		ins(conn, "pm-6", "Start", { delay = 1, n = 6 })
		-- a timer's handler finishes its partition: its other timers go with it
		ins(conn, "pm-10", "Start", { delay = 0, type = "Finish" })
		ins(conn, "pm-10", "Start", { delay = 3600, key = "later" })
		ins(conn, "u-1", "Go", { delay = 3600, n = 1 })
		ins(conn, "u-1", "Go", { delay = 0.2, n = 2 })
		-- pm-6's timer is due after the others: once it fired, so would they have
		h.wait_until(function() return count("SELECT count(*) FROM pm_log WHERE n = 6") == 1 end, 20, "pm-6's timer")
		h.wait_until(function() return count("SELECT count(*) FROM uni_log") == 1 end, 20, "uni's timer")
		assert.same({ "Start", "Start", "Deadline:2" }, log_of("pm-2"))
		assert.same({ "Start" }, log_of("pm-3"))
		assert.same({ "Start", "Deadline:4" }, log_of("pm-4"))
		assert.same({}, log_of("pm-5"))
		assert.same({ "Start", "Start", "Finish" }, log_of("pm-10"))
		assert.same({ "done", "2" }, (function()
			local r = assert(conn:query([[SELECT status, last_pos FROM projhost.checkpoints
				WHERE projection = 'pm' AND partition = 'pm-10']]))[1]
			return { r.status, r.last_pos }
		end)())
		assert.same({ "Ping", "2", "t" }, (function()
			local r = assert(conn:query("SELECT what, n, timer FROM uni_log"))[1]
			return { r.what, r.n, r.timer }
		end)())
		assert.equal(0, count("SELECT count(*) FROM projhost.timers"))
		host:kill(15)
		assert.equal(0, host:wait(15), host:output())
	end)

	it("a failing timer follows on_error: retried, parked (dropped, said), failed (kept: resume fires it)",
		function()
		h.write_file(dir .. "/bad.lua", BAD)
		ins(conn, "bad-1", "Arm", { types = { "Flaky" } })
		ins(conn, "bad-2", "Arm", { types = { "Loop" } })
		ins(conn, "bad-3", "Arm", { types = { "Gate" } })
		local err = run_once()
		-- Flaky: run twice (retried once), then dropped with an error line
		assert.equal("2", scalar(conn, "SELECT last_value FROM bad_flaky_seq"))
		assert.matches("timer bad%-1 %(Flaky%) failed %(attempt 2%): [^\n]*flaky timer %-> park", err)
		assert.matches("timer bad%-1 %(Flaky%) dropped after on_error \"park\"", err)
		-- Loop: the watchdog killed its worker in the timer's batch; retried, fired once
		assert.matches("overran", err, 1, true)
		assert.same({ "Loop" }, (function()
			local out = {}
			for _, r in ipairs(assert(conn:query("SELECT what FROM bad_log WHERE stream = 'bad-2'"))) do
				out[#out + 1] = r.what
			end
			return out
		end)())
		-- Gate: its partition failed, the timer kept
		assert.equal("failed", scalar(conn, [[SELECT status FROM projhost.checkpoints
			WHERE projection = 'bad' AND partition = 'bad-3']]))
		assert.equal("bad-3", scalar(conn, "SELECT string_agg(partition, ',') FROM projhost.timers"))
		-- the partitions go on; resume fires the kept timer
		ins(conn, "bad-1", "Later")
		assert(conn:exec("INSERT INTO bad_fix VALUES (1)"))
		local code, out, rerr = h.run({ "resume", "bad", "--partition", "bad-3", "--db", dsn })
		assert.equal(0, code, out .. rerr)
		run_once()
		assert.equal(1, count("SELECT count(*) FROM bad_log WHERE stream = 'bad-1' AND what = 'Later'"))
		assert.equal(1, count("SELECT count(*) FROM bad_log WHERE stream = 'bad-3' AND what = 'Gate'"))
		assert.equal(0, count("SELECT count(*) FROM projhost.timers"))
	end)

	it("a host started later fires at their due time the timers a stopped one scheduled", function()
		ins(conn, "pm-9", "Start", { delay = 1, n = 9 })
		ins(conn, "u-2", "Go", { delay = 1, n = 9 })
		run_once()
		assert.equal(2, count("SELECT count(*) FROM projhost.timers"))
		local host = h.spawn({ "run", "--db", dsn, dir }, NO_POLL)
		h.wait_until(function() return count("SELECT count(*) FROM projhost.timers") == 0 end, 20, "both fired")
		assert.same({ "Start", "Deadline:9" }, log_of("pm-9"))
		assert.equal(1, count("SELECT count(*) FROM uni_log WHERE n = 9"))
		host:kill(15)
		assert.equal(0, host:wait(15), host:output())
	end)

	it("reset drops the projection's timers", function()
		ins(conn, "pm-7", "Start", { delay = 3600, n = 7 })
		run_once()
		assert.equal(1, count("SELECT count(*) FROM projhost.timers WHERE projection = 'pm'"))
		local code, out, err = h.run({ "reset", "pm", "--db", dsn })
		assert.equal(0, code, out .. err)
		run_once()
		-- rebuilt from the start: Start ran again and scheduled it again, once
		assert.equal(1, count("SELECT count(*) FROM projhost.timers WHERE projection = 'pm'"))
		assert.same({ "Start" }, log_of("pm-7"))
	end)

	it("a shadow rebuild schedules its own timers, which replace the old version's at the switch-over", function()
		local SH = [=[
return {
	name = "sh",
	version = %d,
	partition = "stream",
	from = { category = "sh" },
	when = {
		Start = function(s, e, ctx) ctx:schedule(3600, "Deadline", { v = %d }, { key = "k" }) end,
		Deadline = function() end,
	},
}
]=]
		h.write_file(dir .. "/sh.lua", SH:format(1, 1))
		ins(conn, "sh-1", "Start")
		run_once()
		assert.equal("sh 1", scalar(conn, "SELECT projection || ' ' || (data->>'v') FROM projhost.timers"))
		h.write_file(dir .. "/sh.lua", SH:format(2, 2))
		local err = run_once()
		assert.matches("version 2 caught up in the shadow: switched over", err, 1, true)
		-- the rebuild's timer, under the name again; the old version's is gone
		assert.equal("sh 2", scalar(conn, "SELECT string_agg(projection || ' ' || (data->>'v'), ',') FROM projhost.timers"))
	end)

	it("fires once when the host is SIGKILLed in the timer's batch; another host fires it", function()
		local a = h.spawn({ "run", "--db", dsn, dir })
		ins(conn, "pm-8", "Start", { delay = 0, n = 8, type = "Hang" })
		h.wait_until(function()
			local rows = conn:query("SELECT is_called FROM pm_hang_seq")
			return rows and rows[1].is_called == "t"
		end, 20, "the timer's batch to hang")
		a:kill(9)
		a:wait(10)
		assert.equal(1, count("SELECT count(*) FROM projhost.timers WHERE projection = 'pm'"))
		local b = h.spawn({ "run", "--db", dsn, dir }, NO_POLL)
		h.wait_until(function() return count("SELECT count(*) FROM projhost.timers") == 0 end, 20, "the timer fired")
		b:kill(15)
		assert.equal(0, b:wait(15), b:output())
		-- the killed batch left nothing: one Hang row, of the batch that committed
		assert.same({ "Start", "Hang" }, log_of("pm-8"))
	end)

	it("counts on /metrics the timers a discovery round fired itself", function()
		-- another host wins new stream pm-f1 while this one's walk chunk
		-- waits on its row: the chunk fails (23505) and runs as a job
		-- inside the round, which fires the winner's due timer - and no
		-- job's answer follows to say so
		run_once()
		ins(conn, "pm-f1", "Many", { k = 0 })
		local other = h.connect(dsn)
		assert(other:exec("BEGIN"))
		assert(other:exec([[INSERT INTO projhost.checkpoints (projection, partition, state, last_pos)
			VALUES ('pm', 'pm-f1', '{}', 1)]]))
		assert(other:exec([[INSERT INTO projhost.timers (projection, partition, due, timer_type, data)
			VALUES ('pm', 'pm-f1', now() - interval '1 second', 'Deadline', '{"n": 1}')]]))
		local host = h.spawn({ "run", "--workers", "1", "--db", dsn, "--http", "127.0.0.1:0", dir }, NO_POLL)
		local addr = h.wait_until(function()
			return host:output():match("serving HTTP on http://(127%.0%.0%.1:%d+)/")
		end, 10, "the HTTP address")
		h.wait_until(function()
			return count([[SELECT count(*) FROM pg_stat_activity
				WHERE application_name = 'projhost worker' AND wait_event_type = 'Lock']]) == 1
		end, 20, "the chunk to wait on the other host's row")
		assert(other:exec("COMMIT"))
		other:close()
		h.wait_until(function()
			return count("SELECT count(*) FROM pm_log WHERE what = 'Deadline' AND stream = 'pm-f1'") == 1
		end, 20, "the timer fired")
		local fired
		pcall(h.wait_until, function()
			local m = h.read_all("curl -s http://" .. addr .. "/metrics")
			fired = tonumber(m:match('projhost_timers_fired_total{projection="pm"} (%d+)') or 0)
			return fired >= 1
		end, 5, "1 fired on /metrics")
		assert.equal(1, fired, host:output())
	end)

	it("two hosts fire 1,000 timers across 100 partitions exactly once each", function()
		assert(conn:exec([[SELECT projhost.append('pm-m' || s, NULL, '[{"type":"Many","data":{"k":10}}]')
			FROM generate_series(1, 100) s]]))
		local args = { "run", "--workers", "2", "--db", dsn, "--http", "127.0.0.1:0", dir }
		local hosts = { h.spawn(args, NO_POLL), h.spawn(args, NO_POLL) }
		h.wait_until(function() return count("SELECT count(*) FROM pm_log WHERE what = 'Deadline'") >= 1000 end,
			60, "1,000 timers")
		h.wait_until(function() return count("SELECT count(*) FROM projhost.timers") == 0 end, 10, "no timer left")
		-- each host counts what its workers fired: 1,000 together (once the
		-- last batches' answers, which follow their commits, are in)
		local addrs = {}
		for i, p in ipairs(hosts) do
			addrs[i] = h.wait_until(function()
				return p:output():match("serving HTTP on http://(127%.0%.0%.1:%d+)/")
			end, 10, "the HTTP address")
		end
		local fired
		pcall(h.wait_until, function()
			fired = 0
			for _, addr in ipairs(addrs) do
				local m = h.read_all("curl -s http://" .. addr .. "/metrics")
				fired = fired + tonumber(m:match('projhost_timers_fired_total{projection="pm"} (%d+)') or 0)
			end
			return fired >= 1000
		end, 10, "1,000 fired on /metrics")
		assert.equal(1000, fired)
		for _, p in ipairs(hosts) do p:kill(15) end
		for _, p in ipairs(hosts) do assert.equal(0, p:wait(15), p:output()) end
		assert.equal(1000, count("SELECT count(*) FROM pm_log WHERE what = 'Deadline'"))
		assert.equal(1000, count("SELECT count(DISTINCT (stream, n)) FROM pm_log WHERE what = 'Deadline'"))
		assert.equal(0, count([[SELECT count(*) FROM projhost.checkpoints
			WHERE projection = 'pm' AND partition <> '' AND (state->>'fired')::int <> 10]]))
	end)

	it("every = 1: two hosts run the tick once per interval, in its own batch, with a usable ctx", function()
		h.write_file(dir .. "/cron.lua", CRON)
		local args = { "run", "--db", dsn, dir }
		local hosts = { h.spawn(args, NO_POLL), h.spawn(args, NO_POLL) }
		h.wait_until(function() return count("SELECT count(*) FROM cron_ticks") >= 4 end, 20, "4 ticks")
		for _, p in ipairs(hosts) do p:kill(15) end
		for _, p in ipairs(hosts) do assert.equal(0, p:wait(15), p:output()) end
		local rows = assert(conn:query("SELECT at, n FROM cron_ticks ORDER BY seq"))
		for i, r in ipairs(rows) do
			-- the state went on from tick to tick, and the due times are a second apart
			assert.equal(tostring(i), r.n)
			if i > 1 then assert.near(1, tonumber(r.at) - tonumber(rows[i - 1].at), 1e-3) end
		end
		-- re-armed: one tick row is left, due within the next second
		assert.equal(1, count("SELECT count(*) FROM projhost.timers WHERE projection = 'cron'"))
	end)
end)
