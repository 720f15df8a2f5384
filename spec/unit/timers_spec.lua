-- Durable timers without a database: ctx:schedule / ctx:cancel check their
-- arguments (programmer errors raise at the handler's line) and hand the
-- backend what the worker writes; the loader checks every / tick; the
-- worker's merge puts a timer among its partition's events by time.
local P = require "projhost.projection"
local loader = require "projhost.loader"

local PART = [[
return {
	name = "t",
	partition = "stream",
	from = { category = "t" },
	when = { A = function() end, Deadline = function() end },
}
]]

local function def_of(source, path)
	return assert(loader.load_source(source, path or "t.lua"))
end

-- a backend that records schedule / cancel calls
local function recorder()
	local b = { calls = {} }
	function b.exec() return 1 end
	function b.query() return {} end
	function b.emit() return 1 end
	function b.log() end
	function b.schedule(t) b.calls[#b.calls + 1] = { "schedule", t }; return true end
	function b.cancel(part, key) b.calls[#b.calls + 1] = { "cancel", part, key }; return true end
	return b
end

local function ctx_in_handler(def, b)
	local ctx = P.new_ctx(def, b)
	ctx.event = { stream = "t-1", partition = "t-1", version = 1, type = "A" }
	return ctx
end

-- the error of f(), which must raise, and the line it names
local function raised(f)
	local ok, err = pcall(f)
	assert.is_false(ok)
	return err
end

describe("ctx:schedule", function()
	local def = def_of(PART)

	it("hands the backend the timer of the event's partition", function()
		local b = recorder()
		local ctx = ctx_in_handler(def, b)
		assert.is_true(ctx:schedule(1.5, "Deadline", { x = 1 }))
		assert.is_true(ctx:schedule(nil, "Deadline", nil, { at = 1e9, key = "k" }))
		assert.is_true(ctx:cancel("k"))
		assert.same({
			{ "schedule", { partition = "t-1", delay = 1.5, type = "Deadline", data = { x = 1 } } },
			{ "schedule", { partition = "t-1", at = 1e9, key = "k", type = "Deadline" } },
			{ "cancel", "t-1", "k" },
		}, b.calls)
	end)

	it("an unpartitioned projection's timers are partition \"\" (also outside a handler: caught_up, tick)",
		function()
		local d = def_of([[return { name = "u", from = { all = true }, when = { ["*"] = function() end } }]])
		local b = recorder()
		local ctx = P.new_ctx(d, b)
		ctx:schedule(0, "Anything")
		assert.equal("", b.calls[1][2].partition)
	end)

	it("refuses wrong arguments with the caller's line", function()
		local ctx = ctx_in_handler(def, recorder())
		local here = debug.getinfo(1, "l").currentline
		local cases = {
			{ function() ctx:schedule(-1, "Deadline") end, "delay must be a number of seconds from 0" },
			{ function() ctx:schedule(0 / 0, "Deadline") end, "delay must be a number of seconds from 0 to 3153600000 (got nan" },
			{ function() ctx:schedule(math.huge, "Deadline") end, "delay must be" },
			{ function() ctx:schedule("1", "Deadline") end, "(got string)" },
			{ function() ctx:schedule(nil, "Deadline") end, "delay must be" },
			{ function() ctx:schedule(1, "Deadline", nil, { at = 5 }) end, "give a delay or { at = }, not both" },
			{ function() ctx:schedule(nil, "Deadline", nil, { at = 1 / 0 }) end, "at must be a unix time from 0 to 253402300799" },
			{ function() ctx:schedule(nil, "Deadline", nil, { at = -1 }) end, "at must be a unix time" },
			{ function() ctx:schedule(nil, "Deadline", nil, { at = "x" }) end, "(got string)" },
			{ function() ctx:schedule(1, "", nil) end, "type must be a non-empty string" },
			{ function() ctx:schedule(1, 5, nil) end, "type must be a non-empty string of at most 1024 bytes without NUL (got number)" },
			{ function() ctx:schedule(1, "Dead\0line") end, "without NUL" },
			{ function() ctx:schedule(1, ("x"):rep(1025)) end, "(got 1025 bytes)" },
			{ function() ctx:schedule(1, "Nope") end, "no handler for 'Nope' in when" },
			{ function() ctx:schedule(1, "Deadline", "text") end, "data must be a table or nil (got string)" },
			{ function() ctx:schedule(1, "Deadline", { f = print }) end, "data cannot be encoded as JSON" },
			{ function() ctx:schedule(1, "Deadline", nil, "k") end, "options must be a plain table" },
			{ function() ctx:schedule(1, "Deadline", nil, setmetatable({}, {})) end, "options must be a plain table" },
			{ function() ctx:schedule(1, "Deadline", nil, { kye = "x" }) end, "unknown option 'kye' (known: at, key)" },
			{ function() ctx:schedule(1, "Deadline", nil, { key = "" }) end, "key must be a non-empty string" },
			{ function() ctx:schedule(1, "Deadline", nil, { key = 7 }) end, "key must be a non-empty string" },
			{ function() ctx:cancel("") end, "ctx:cancel: key must be a non-empty string" },
			{ function() ctx:cancel(("k"):rep(1025)) end, "at most 1024 bytes" },
			{ function() ctx.schedule(nil, 1, "Deadline") end, "call it with a colon" },
		}
		for i, c in ipairs(cases) do
			local err = raised(c[1])
			assert.matches(c[2], err, 1, true)
			-- the line of the call in the function above, not projection.lua's
			assert.matches("timers_spec.lua:" .. (here + 1 + i) .. ":", err, 1, true)
		end
	end)

	it("needs an event in a partitioned projection", function()
		local ctx = P.new_ctx(def, recorder())
		assert.matches("ctx:schedule: call it in a handler", raised(function() ctx:schedule(1, "Deadline") end))
		assert.matches("ctx:cancel: call it in a handler", raised(function() ctx:cancel("k") end))
	end)

	it("raises the backend's failure", function()
		local b = recorder()
		function b.schedule() return nil, "boom", "XX000" end
		local ctx = ctx_in_handler(def, b)
		assert.matches("ctx:schedule: boom [XX000]", raised(function() ctx:schedule(1, "Deadline") end), 1, true)
	end)
end)

describe("a timer as a handler sees it", function()
	it("has timer, type, data, key, time and its partition, and no position, version or id", function()
		local def = def_of(PART)
		local seen
		def.when.Deadline = function(_, e) seen = e end
		P.apply(def, {}, { timer = true, position = -7, id = 7, type = "Deadline", key = "k", partition = "t-1",
			stream = "t-1", data = { n = 1 }, time = "2026-01-01T00:00:00Z" }, nil)
		assert.same({ true, "Deadline", "k", "t-1", 1, "2026-01-01T00:00:00Z" },
			{ seen.timer, seen.type, seen.key, seen.stream, seen.data.n, seen.time })
		assert.is_nil(seen.position)
		assert.is_nil(seen.version)
		assert.is_nil(seen.id)
	end)
end)

describe("every / tick", function()
	local function load_error(src)
		local def, err = loader.load_source(src, "cron.lua")
		assert.is_nil(def)
		return err
	end

	it("loads with both on an unpartitioned projection; tick gets the state, ctx and the due time", function()
		local def = def_of([[return { from = { all = true }, every = 2, when = { A = function() end },
			tick = function(s, ctx, now) s.at = now end }]], "cron.lua")
		assert.equal(2, def.every)
		local s = P.apply(def, {}, { timer = true, tick = true, due = 123.5, type = "tick", partition = "" }, nil)
		assert.same({ at = 123.5 }, s)
	end)

	it("refuses a partitioned projection, one without the other, and wrong values, naming the file", function()
		local base = 'from = { all = true }, when = { A = function() end }'
		assert.equal("cron.lua:1: 'every' and 'tick' need an unpartitioned projection (omit 'partition')",
			load_error("return { " .. base .. ", partition = \"stream\", every = 1, tick = function() end }"))
		assert.equal("cron.lua:1: 'every' needs 'tick' (a function(s, ctx, now))",
			load_error("return { " .. base .. ", every = 1 }"))
		assert.equal("cron.lua:2: 'tick' needs 'every' (seconds between ticks)",
			load_error("return { " .. base .. ",\n tick = function() end }"))
		assert.matches("^cron.lua:1: 'every' must be a number of seconds from 0.1 to 31622400 %(got 0%)$",
			load_error("return { " .. base .. ", every = 0, tick = function() end }"))
		assert.matches("(got string)", load_error("return { " .. base .. ", every = '1', tick = function() end }"),
			1, true)
		assert.matches("(got nan)", load_error("return { " .. base .. ", every = 0/0, tick = function() end }"),
			1, true)
		assert.matches("'tick' must be a function(s, ctx, now) (got number)",
			load_error("return { " .. base .. ", every = 1, tick = 1 }"), 1, true)
	end)
end)

describe("the worker's merge", function()
	local timers = require "projhost.worker.timers"

	it("reads events' times", function()
		assert.equal(0, timers.epoch_of("1970-01-01T00:00:00Z"))
		assert.equal(1764620000.25, timers.epoch_of("2025-12-01T20:13:20.25Z"))
		assert.is_nil(timers.epoch_of("nonsense"))
	end)

	local function ev(v, t) return { version = v, position = v, time = t } end
	local function tm(id, due) return { timer = true, id = id, position = -id, due = due } end
	local function order(list)
		local out = {}
		for _, e in ipairs(list) do out[#out + 1] = e.timer and ("t" .. e.id) or ("e" .. e.version) end
		return table.concat(out, " ")
	end

	it("puts a timer after the events at or before its due time, before later ones", function()
		local events = { ev(1, "1970-01-01T00:00:10Z"), ev(2, "1970-01-01T00:00:20Z"), ev(3, "1970-01-01T00:00:30Z") }
		local groups = { { part = "p", i0 = 1, i1 = 3, status = "idle", last = 3 } }
		local out, n, last, fired = timers.merge(events, groups, { p = { tm(1, 5), tm(2, 20), tm(3, 25), tm(4, 99) } })
		assert.equal("t1 e1 e2 t2 t3 e3 t4", order(out))
		assert.same({ 3, 3 }, { n, last.version })
		assert.same({ 1, 2, 3, 4 }, fired)
		assert.same({ 1, 7 }, { groups[1].i0, groups[1].i1 })
		for i, e in ipairs(out) do assert.equal(i, e.index) end
	end)

	it("keeps a cut-short partition's later timers for its next batch", function()
		local events = { ev(1, "1970-01-01T00:00:10Z"), ev(2, "1970-01-01T00:00:20Z") }
		local groups = { { part = "p", i0 = 1, i1 = 2, status = "more", last = 2 } }
		local out, _, _, fired = timers.merge(events, groups, { p = { tm(1, 15), tm(2, 30) } })
		assert.equal("e1 t1 e2", order(out))
		assert.same({ 1 }, fired)
	end)
end)

describe("projhost.testing", function()
	local T = require "projhost.testing"

	it("keeps pending timers, fires them as the worker does, runs a tick", function()
		local p = T.load_source([[return {
			partition = "stream", from = { category = "o" },
			when = {
				Opened = function(s, e, ctx) ctx:schedule(900, "Expire", { id = e.stream }, { key = "exp" }) end,
				Paid = function(s, e, ctx) ctx:cancel("exp") end,
				Fail = function(s, e, ctx) ctx:schedule(1, "Expire"); error("no") end,
				Expire = function(s, e) s.expired = { e.timer, e.key, e.data.id, e.time } end,
			} }]], "o.lua")
		p:given({ type = "Opened", stream = "o-1" }, { type = "Opened", stream = "o-2" }, { type = "Opened", stream = "o-1" })
		assert.same({ { partition = "o-1", delay = 900, type = "Expire", data = { id = "o-1" }, key = "exp" },
			{ partition = "o-2", delay = 900, type = "Expire", data = { id = "o-2" }, key = "exp" } },
			(function() local l = p:timers(); table.sort(l, function(a, b) return a.partition < b.partition end); return l end)())
		p:given({ type = "Paid", stream = "o-2" })
		assert.has_error(function() p:given({ type = "Fail", stream = "o-3" }) end)
		assert.equal(1, #p:timers())
		p:fire()
		assert.same({ expired = { true, "exp", "o-1", T.TIME } }, p:state("o-1"))
		assert.same({}, p:timers())
		local c = T.load_source([[return { from = { all = true }, every = 60, when = { A = function() end },
			tick = function(s, ctx, now) s.last = now end }]], "c.lua")
		assert.same({ last = 120 }, c:tick(120):state())
	end)
end)
