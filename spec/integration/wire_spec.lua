-- The master/worker messages (core/proto.h) against hostile user data:
-- stream names with tabs, newlines, backslashes and any other byte, and
-- stream names long enough to push a message past the frame limit.
-- Events are inserted with SQL (projhost.append refuses such names).
local h = require "helpers"
local scalar = h.scalar

-- One row per applied event under a unique key: an event applied twice
-- fails the batch (and on_error = "fail" shows it in the checkpoints).
local function projection(name, from, partitioned)
	return string.format([[
return {
	name = %q,
	from = %s,
	%s
	setup = "CREATE TABLE IF NOT EXISTS %s_applied (stream text, version bigint, PRIMARY KEY (stream, version))",
	when = {
		["*"] = function(s, e, ctx)
			ctx:exec("INSERT INTO %s_applied VALUES ($1, $2)", e.stream, e.version)
		end,
	},
	on_error = function() return "fail" end,
}
]], name, from, partitioned and 'partition = "stream",' or "", name, name)
end

-- events of `streams` (name -> number of events), as projhost.append would
-- leave them, and their streams rows
local function insert(conn, streams)
	for stream, n in pairs(streams) do
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			SELECT $1, v, 'Inc', '{}' FROM generate_series(1, $2::int) v]], stream, n))
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position, updated_at)
			SELECT stream_id, max(stream_version), max(global_position), now() FROM projhost.events
			WHERE stream_id = $1 GROUP BY 1]], stream))
	end
end

local function applied(conn, name)
	return assert(conn:query("SELECT stream, version::text AS version FROM " .. name .. "_applied ORDER BY 1, 2"))
end

local function truth(conn, where, ...)
	return assert(conn:query([[SELECT stream_id AS stream, stream_version::text AS version
		FROM projhost.events WHERE ]] .. where .. " ORDER BY 1, 2", ...))
end

local function assert_clean_log(out)
	assert.not_matches("died", out, 1, true)
	assert.not_matches("exited unexpectedly", out, 1, true)
	assert.not_matches("corrupt frame", out, 1, true)
	assert.not_matches("unknown message", out, 1, true)
	assert.not_matches("internal error", out, 1, true)
end

describe("master/worker messages", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("wire")
		conn = h.connect(dsn)
		dir = h.tmpdir()
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("carry stream names with tabs, newlines, backslashes and any other byte", function()
		local every = {}
		for b = 1, 127 do every[#every + 1] = string.char(b) end
		local odd = "a\tb\nc\\d"
		local streams = {
			[odd] = 2,
			["w\tc-" .. table.concat(every) .. "é€"] = 3,
			["w\tc-\\t\\n\\\\"] = 1,	-- literal backslash sequences
			["w\tc-\\"] = 1,		-- a trailing backslash
			["w\tc-\n"] = 1,
		}
		h.write_file(dir .. "/wp.lua", projection("wp", "{ all = true }", true))
		h.write_file(dir .. "/wu.lua", projection("wu", "{ all = true }", false))
		h.write_file(dir .. "/ws.lua", projection("ws", string.format("{ stream = %q }", odd), false))
		h.write_file(dir .. "/wc.lua", projection("wc", '{ category = "w\\tc" }', true))
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		insert(conn, streams)
		code, out, err = h.run({ "run", "--once", "--workers", "2", "--db", dsn, dir }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		assert_clean_log(out .. err)
		local all = truth(conn, "true")
		assert.equal(8, #all)
		assert.same(all, applied(conn, "wp"))
		assert.same(all, applied(conn, "wu"))
		assert.same(truth(conn, "stream_id = $1", odd), applied(conn, "ws"))
		assert.equal(2, #applied(conn, "ws"))
		assert.same(truth(conn, "stream_id LIKE $1", "w\tc-%"), applied(conn, "wc"))
		assert.equal(6, #applied(conn, "wc"))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status <> 'running'"))
		-- and live: the host follows appends to such a stream
		local p = h.spawn({ "run", "--db", dsn, dir })
		h.wait_until(function() return p:output():find("listening", 1, true) end, 30, "the host to listen")
		insert(conn, { ["a\tb\nc\\d\tlive"] = 1 })
		assert(conn:exec("NOTIFY projhost"))
		h.wait_until(function() return #applied(conn, "wp") == 9 and #applied(conn, "wu") == 9 end, 30,
			"the live event applied")
		p:kill(15)
		assert.equal(0, p:wait(15), p:output())
		assert_clean_log(p:output())
		assert.same(truth(conn, "true"), applied(conn, "wp"))
	end)

	it("carry a dsn and projection paths with tabs and newlines", function()
		local odd = h.tmpdir() .. "/dir\twith tab\nand\\newline"
		assert(require("lfs").mkdir(odd))
		h.write_file(odd .. "/wu.lua", projection("wu", "{ all = true }", false))
		h.write_file(odd .. "/wp.lua", projection("wp", "{ all = true }", true))
		-- libpq reads a tab between keywords like a space
		local tabbed = dsn:gsub(" ", "\t")
		local code, out, err = h.run({ "run", "--once", "--db", tabbed, odd }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		insert(conn, { ["s-1"] = 2 })
		code, out, err = h.run({ "run", "--once", "--db", tabbed, odd .. "/wu.lua", odd .. "/wp.lua" }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		assert_clean_log(out .. err)
		assert.same(truth(conn, "true"), applied(conn, "wu"))
		assert.same(truth(conn, "true"), applied(conn, "wp"))
	end)

	it("keep every job and answer under the frame limit with 100 stream names of 200 KB", function()
		h.write_file(dir .. "/big.lua", projection("big", '{ category = "big" }', true))
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		-- (they compress to ~2.3 KB: a btree entry holds ~2.7 KB)
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			SELECT 'big-' || i || '-' || repeat('x', 200000), 1, 'Inc', '{}' FROM generate_series(1, 100) i]]))
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position, updated_at)
			SELECT stream_id, max(stream_version), max(global_position), now() FROM projhost.events
			WHERE stream_id LIKE 'big-%' GROUP BY 1]]))
		assert.equal("100", scalar(conn, "SELECT count(*) FROM projhost.streams WHERE length(stream_id) > 200000"))
		code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { timeout = 120 })
		assert.equal(0, code, out .. err)
		assert_clean_log(out .. err)
		assert.same(truth(conn, "stream_id LIKE 'big-%'"), applied(conn, "big"))
		assert.equal(100, #applied(conn, "big"))
	end)

	-- A worker that dies inside projection code (not only the watchdog's
	-- kill past the budget) has the event charged with it, with the kind
	-- of code and a reason, and on_error decides; the batch is not redone
	-- for ever.
	local DIES = [[
return {
	name = "dies",
	from = { category = "d" },
	%s
	options = { budget = %d },
	setup = "CREATE TABLE IF NOT EXISTS dies_applied (stream text, version bigint, PRIMARY KEY (stream, version))",
	when = {
		Inc = function(s, e, ctx)
			ctx:exec("INSERT INTO dies_applied VALUES ($1, $2)", e.stream, e.version)
		end,
		Boom = function(s, e, ctx)
			%s
		end,
	},
	on_error = function(err, e, attempt) return "park" end,
}
]]

	local function events(conn)
		insert(conn, { ["d-1"] = 1 })
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			VALUES ('d-1', 2, 'Boom', '{}'), ('d-1', 3, 'Inc', '{}')]]))
		assert(conn:exec("UPDATE projhost.streams SET version = 3, last_position = (SELECT max(global_position) FROM projhost.events) WHERE stream_id = 'd-1'"))
	end

	for _, partitioned in ipairs({ false, true }) do
		local what = partitioned and "partitioned" or "unpartitioned"

		it("charge exit() in a C library (lua-cjson out of memory) to the event, " .. what, function()
			if h.bin:find("build%-asan") then
				return pending("sanitizer builds run workers without a memory limit")
			end
			-- lua-cjson's buffer outgrows the worker's memory limit:
			-- lua-cjson calls exit(-1)
			h.write_file(dir .. "/dies.lua", DIES:format(partitioned and 'partition = "stream",' or "", 30,
				'local s = string.rep("x", 120 * 2^20); json.encode({ s, s, s })'))
			local env = { PROJHOST_WORKER_MEMORY_MB = 300 }
			local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = env, timeout = 60 })
			assert.equal(0, code, out .. err)
			events(conn)
			code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = env, timeout = 60 })
			assert.equal(0, code, out .. err)
			assert.matches("died during a batch (exit 255) running handler code", err, 1, true)
			assert.equal(2, #applied(conn, "dies"))
			local perr = scalar(conn, "SELECT error FROM projhost.parked")
			assert.matches("dies.lua: handler not enough memory (the worker died with exit 255, as lua-cjson exits when an allocation fails)", perr, 1, true)
			assert.equal("1", scalar(conn, "SELECT count(*) FROM projhost.parked"))
		end)

		it("charge a signal to the event, with the kind and the signal, " .. what, function()
			h.write_file(dir .. "/dies.lua", DIES:format(partitioned and 'partition = "stream",' or "", 120,
				"while true do end"))
			local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { timeout = 60 })
			assert.equal(0, code, out .. err)
			events(conn)
			local p = h.spawn({ "run", "--db", dsn, dir })
			-- the worker spins in the handler of event 2: its transaction
			-- is open and idle
			h.wait_until(function()
				return scalar(conn, [[SELECT count(*) FROM pg_stat_activity WHERE datname = 'wire'
					AND state = 'idle in transaction' AND now() - state_change > interval '300 ms']]) == "1"
			end, 30, "the handler to spin")
			local children = h.read_file(string.format("/proc/%d/task/%d/children", p.pid, p.pid))
			local worker = tonumber(children:match("%d+"))
			assert.is_number(worker)
			require("projhost.core").kill(worker, 11)
			-- AddressSanitizer catches the SIGSEGV and aborts
			local sig = h.bin:find("build%-asan") and 6 or 11
			h.wait_until(function() return #applied(conn, "dies") == 2 end, 30, "the other events applied")
			p:kill(15)
			assert.equal(0, p:wait(15), p:output())
			assert.matches("died during a batch (signal " .. sig .. ") running handler code", p:output(), 1, true)
			local perr = scalar(conn, "SELECT error FROM projhost.parked")
			assert.matches("dies.lua: handler the worker died (signal " .. sig .. ")", perr, 1, true)
			assert.equal("1", scalar(conn, "SELECT count(*) FROM projhost.parked"))
		end)
	end
end)
