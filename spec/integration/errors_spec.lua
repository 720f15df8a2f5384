-- Error actions, dead letters, operator commands and runaway handlers, on a
-- real PostgreSQL (design §3, issue 4).
local h = require "helpers"
local scalar = h.scalar
local core = require "projhost.core"

-- A projection over category `err` whose handler writes a row per event
-- (then fails for `Bad` events, after its write) so a failure that left a
-- trace would show up as a row. BODY is spliced in as extra fields.
local function projection(name, extra, bad)
	return ([[
return {
	name = "%s",
	from = { category = "err" },
	setup = "CREATE TABLE IF NOT EXISTS %s_rows (position bigint PRIMARY KEY, type text)",
	reset = "TRUNCATE %s_rows",
	init = function() return { n = 0 } end,
	when = {
		["*"] = function(s, e, ctx)
			ctx:exec("INSERT INTO %s_rows VALUES ($1, $2)", e.position, e.type)
			s.n = s.n + 1
			%s
		end,
	},
	%s
}
]]):format(name, name, name, name, bad or 'if e.type == "Bad" then error("bad event " .. e.id) end', extra or "")
end

local function rows_of(conn, name)
	local rows = conn:query("SELECT type FROM " .. name .. "_rows ORDER BY position")
	local out = {}
	for i, r in ipairs(rows or {}) do out[i] = r.type end
	return out
end

describe("error actions", function()
	local dsn, conn, dir

	local function append(stream, etype)
		local code, _, err = h.run({ "append", stream, etype, "{}", "--db", dsn })
		assert.equal(0, code, err)
	end

	local function run_once(env)
		return h.run({ "run", "--once", "--db", dsn, dir }, { env = env })
	end

	before_each(function()
		dsn = h.fresh_db("errors")
		conn = h.connect(dsn)
		dir = h.tmpdir()
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("retries with the attempt count, then skips; the failing event leaves no trace", function()
		h.write_file(dir .. "/p.lua", projection("p",
			'on_error = function(err, e, attempt) if attempt < 3 then return "retry", 0.05 end return "skip" end,'))
		append("err-1", "Good")
		append("err-1", "Bad")
		append("err-2", "Good")
		local code, out, err = run_once()
		assert.equal(0, code, out .. err)
		-- the Bad handler inserted its row before failing: rolled back
		assert.same({ "Good", "Good" }, rows_of(conn, "p"))
		assert.equal("2", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'p'"))
		assert.matches("attempt 1%): .-bad event .- %-> retry", err)
		assert.matches("attempt 2%): .- %-> retry", err)
		assert.matches("attempt 3%): .- %-> skip", err)
		assert.matches("p pos=2 event err%-1@2 %(Bad%)", err)
		assert.matches("p%.lua:%d+:", err) -- the handler's file and line
	end)

	it("parks the event in the dead-letter table, lists it, and retries it on request", function()
		h.write_file(dir .. "/p.lua", projection("p", 'on_error = function() return "park" end,'))
		append("err-1", "Bad")
		append("err-1", "Good")
		local code, out, err = run_once()
		assert.equal(0, code, out .. err)
		assert.same({ "Good" }, rows_of(conn, "p"))
		local parked = assert(conn:query("SELECT * FROM projhost.parked"))
		assert.equal(1, #parked)
		assert.equal("p", parked[1].projection)
		assert.equal("", parked[1].partition)
		assert.equal("1", parked[1].global_position)
		assert.equal("err-1", parked[1].stream_id)
		assert.equal("Bad", parked[1].event_type)
		assert.matches("bad event", parked[1].error)
		local lcode, list = h.run({ "parked", "list", "--db", dsn })
		assert.equal(0, lcode)
		assert.matches("err%-1@1 Bad", list)

		-- fix the projection, then retry the dead letter while a host runs
		h.write_file(dir .. "/p.lua", projection("p", 'on_error = function() return "park" end,', ""))
		local host = h.spawn({ "run", "--db", dsn, dir })
		h.wait_until(function() return host:output():find("serving 1", 1, true) end, 20, "the host")
		local rcode, rout = h.run({ "parked", "retry", "p", "--db", dsn })
		assert.equal(0, rcode)
		assert.matches("retrying 1 parked event", rout)
		h.wait_until(function() return scalar(conn, "SELECT count(*) FROM projhost.parked") == "0" end, 10,
			"the parked event to be applied")
		assert.same({ "Bad", "Good" }, rows_of(conn, "p"))
		assert.equal("2", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'p'"))
		-- the next batch builds on the state the retry wrote (not on a
		-- copy the worker kept from before it)
		append("err-2", "Good")
		h.wait_until(function() return #rows_of(conn, "p") == 3 end, 10, "the next event")
		assert.equal("3", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'p'"))
		host:kill(15)
		assert.equal(0, host:wait(10))
	end)

	it("fail stops only the failing partition; stop stops the projection; resume continues", function()
		h.write_file(dir .. "/part.lua", projection("part",
			'partition = "stream", on_error = function() return "fail" end,'))
		h.write_file(dir .. "/whole.lua", projection("whole", 'on_error = function() return "stop" end,'))
		append("err-1", "Good")
		append("err-1", "Bad")
		append("err-1", "Good")
		append("err-2", "Good")
		local code, out, err = run_once()
		assert.equal(0, code, out .. err)
		-- part: err-1 stopped at its Bad event, err-2 went on
		assert.same({ "Good", "Good" }, rows_of(conn, "part"))
		assert.equal("failed", scalar(conn, [[SELECT status FROM projhost.checkpoints
			WHERE projection = 'part' AND partition = 'err-1']]))
		assert.equal("running", scalar(conn, [[SELECT status FROM projhost.checkpoints
			WHERE projection = 'part' AND partition = 'err-2']]))
		-- whole: stopped at the Bad event
		assert.same({ "Good" }, rows_of(conn, "whole"))
		assert.equal("stopped", scalar(conn, [[SELECT status FROM projhost.checkpoints
			WHERE projection = 'whole' AND partition = '']]))
		assert.matches("err%-1@2 %(Bad%): .-whole%.lua:%d+: bad event", scalar(conn, [[SELECT error FROM projhost.checkpoints
			WHERE projection = 'whole' AND partition = '']]))
		local scode, status = h.run({ "status", "--db", dsn })
		assert.equal(0, scode)
		assert.matches("failed", status)
		assert.matches("stopped", status)

		-- fix both, resume: they continue where they stopped
		h.write_file(dir .. "/part.lua", projection("part", 'partition = "stream",', ""))
		h.write_file(dir .. "/whole.lua", projection("whole", "", ""))
		assert.equal(0, (h.run({ "resume", "part", "--db", dsn })))
		assert.equal(0, (h.run({ "resume", "whole", "--db", dsn })))
		code, out, err = run_once()
		assert.equal(0, code, out .. err)
		assert.same({ "Good", "Bad", "Good", "Good" }, rows_of(conn, "part"))
		assert.same({ "Good", "Bad", "Good", "Good" }, rows_of(conn, "whole"))
	end)

	it("charges a state that cannot be stored to the event that made it so", function()
		-- the Bad event puts a function into the state: its batch cannot be
		-- stored, and neither a partitioned one (the state is per stream)
		local bad = 'if e.type == "Bad" then s.f = function() end end'
		h.write_file(dir .. "/s.lua", projection("s", 'on_error = function() return "skip" end,', bad))
		h.write_file(dir .. "/ps.lua", projection("ps", 'partition = "stream", on_error = function() return "skip" end,', bad))
		for _, t in ipairs({ "Ok", "Ok", "Bad", "Ok" }) do append("err-1", t) end
		local code, out, err = run_once()
		assert.equal(0, code, out .. err)
		for _, name in ipairs({ "s", "ps" }) do
			assert.matches(("ERROR %s +pos=3 event err%%-1@3 %%(Bad%%) failed %%(attempt 1%%): [^\n]*/%s%%.lua: "
				.. "state cannot be stored as JSON[^\n]* %%-> skip"):format(name, name), err)
			-- the others are applied, the Bad one leaves no trace
			assert.same({ "Ok", "Ok", "Ok" }, rows_of(conn, name))
		end
		assert.equal("3", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 's'"))
		assert.not_matches("internal error", err)
	end)

	it("without on_error retries three times with backoff, then fails", function()
		h.write_file(dir .. "/p.lua", projection("p"))
		append("err-1", "Bad")
		local code, out, err = run_once()
		assert.equal(0, code, out .. err)
		assert.matches("attempt 1%).- %-> retry in 0%.50s", err)
		assert.matches("attempt 2%).- %-> retry in 1%.00s", err)
		assert.matches("attempt 3%).- %-> retry in 2%.00s", err)
		assert.matches("attempt 4%).- %-> fail", err)
		assert.equal("failed", scalar(conn, "SELECT status FROM projhost.checkpoints WHERE projection = 'p'"))
		assert.equal("4", scalar(conn, "SELECT attempts FROM projhost.checkpoints WHERE projection = 'p'"))
	end)

	it("falls back to the default action, and says so, when on_error fails or answers nonsense", function()
		h.write_file(dir .. "/a.lua", projection("a", 'on_error = function() error("oops") end,'))
		h.write_file(dir .. "/b.lua", projection("b", 'on_error = function() return "explode" end,'))
		append("err-1", "Bad")
		local host = h.spawn({ "run", "--db", dsn, dir })
		h.wait_until(function()
			local o = host:output()
			return o:find("on_error itself failed", 1, true) and o:find("on_error returned explode", 1, true)
		end, 20, "both fallbacks to be logged")
		assert.matches("a%.lua:%d+: oops", host:output())
		-- each line names the event and the file it is about
		assert.matches("ERROR a +pos=1 [^\n]*/a%.lua: on_error itself failed", host:output())
		assert.matches("ERROR b +pos=1 [^\n]*/b%.lua: on_error returned explode", host:output())
		assert.matches("attempt 1%).- %-> retry in 0%.50s", host:output())
		host:kill(15)
		assert.equal(0, host:wait(10))
	end)

	it("kills a handler stuck in a JIT-compiled loop after its budget and applies on_error", function()
		h.write_file(dir .. "/p.lua", projection("p", [[
	options = { budget = 1 },
	on_error = function(err, e, attempt) return "park" end,]], [[
			if e.type == "Loop" then
				local x = 0
				for i = 1, 1e15 do x = x + i end
				s.x = x
			end]]))
		append("err-1", "Good")
		append("err-1", "Loop")
		append("err-1", "Good")
		local code, out, err = run_once()
		assert.equal(0, code, out .. err)
		assert.matches("p pos=2 handler overran its budget of 1s; killing worker", err)
		assert.matches("died during a batch", err)
		assert.same({ "Good", "Good" }, rows_of(conn, "p"))
		assert.matches("overran its budget of 1s", scalar(conn, "SELECT error FROM projhost.parked"))
		assert.equal("2", scalar(conn, "SELECT global_position FROM projhost.parked"))
	end)

	it("a Lua state that runs out of memory fails only that event and is rebuilt", function()
		h.write_file(dir .. "/p.lua", projection("p", 'on_error = function() return "park" end, options = { budget = 10 },', [[
			if e.type == "Hog" then
				local t = {}
				for i = 1, 1e9 do t[i] = ("x"):rep(4096) .. i end
			end]]))
		append("err-1", "Good")
		append("err-1", "Hog")
		append("err-1", "Good")
		local code, out, err = run_once({ PROJHOST_WORKER_MEMORY_MB = 300 })
		assert.equal(0, code, out .. err)
		assert.same({ "Good", "Good" }, rows_of(conn, "p"))
		local perr = scalar(conn, "SELECT error FROM projhost.parked")
		if (os.getenv("PROJHOST_BIN") or ""):find("asan", 1, true) then
			-- sanitizer builds run without the memory cap (ASan reserves
			-- terabytes of address space): the budget stops the handler
			assert.is_truthy(perr:find("not enough memory", 1, true) or perr:find("overran its budget", 1, true))
		else
			assert.matches("not enough memory", perr)
		end
	end)

	it("pause, resume and reset take effect on a running host within a second or so", function()
		h.write_file(dir .. "/p.lua", projection("p"))
		append("err-1", "Good")
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_POLL_INTERVAL = 600 } })
		h.wait_until(function() return #rows_of(conn, "p") == 1 end, 20, "the first event")
		local code, out = h.run({ "pause", "p", "--db", dsn })
		assert.equal(0, code)
		assert.matches("paused", out)
		append("err-1", "Good")
		core.sleep(1.5)
		assert.equal(1, #rows_of(conn, "p"))
		code, out = h.run({ "resume", "p", "--db", dsn })
		assert.equal(0, code)
		h.wait_until(function() return #rows_of(conn, "p") == 2 end, 3, "resume to take effect")
		-- reset: the reset SQL truncates, the rebuild fills it again
		assert(conn:exec("INSERT INTO p_rows VALUES (999, 'Stale')"))
		code = h.run({ "reset", "p", "--db", dsn })
		assert.equal(0, code)
		h.wait_until(function()
			local r = rows_of(conn, "p")
			return #r == 2 and r[2] == "Good"
		end, 3, "the rebuild")
		h.wait_until(function() return host:output():find("reset, rebuilding", 1, true) end, 3, "the log line")
		host:kill(15)
		assert.equal(0, host:wait(10))
	end)
end)
