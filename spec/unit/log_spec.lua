-- The log encoder (core/log.c) through core.log_line, which renders a
-- record exactly as core.log would write it: json lines are valid JSON of
-- valid UTF-8 for any byte in any field, numbers are integers, absent
-- fields are left out, a long record is cut inside its message only; text
-- lines are what they always were.
local core = require "projhost.core"
local cjson = require "cjson"

local FFFD = "\239\191\189"
local TS = "%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ"

-- RFC 3629 well-formedness (cjson does not check it)
local function utf8_valid(s)
	local i, n = 1, #s
	while i <= n do
		local c = s:byte(i)
		local len, lo, hi = 1, 0x80, 0xBF
		if c < 0x80 then len = 1
		elseif c >= 0xC2 and c <= 0xDF then len = 2
		elseif c >= 0xE0 and c <= 0xEF then
			len = 3
			if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
		elseif c >= 0xF0 and c <= 0xF4 then
			len = 4
			if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
		else return false end
		for k = 1, len - 1 do
			local b = s:byte(i + k)
			if not b or b < (k == 1 and lo or 0x80) or b > (k == 1 and hi or 0xBF) then return false end
		end
		i = i + len
	end
	return true
end

local function json(level, who, msg, fields)
	local line = core.log_line(level, who, msg, fields, "json")
	assert.equal("\n", line:sub(-1))
	local body = line:sub(1, -2)
	assert.is_nil(body:find("[%z\1-\31\127]"), "a raw control byte in " .. body)
	assert.is_true(utf8_valid(body), "invalid UTF-8: " .. body)
	local ok, rec = pcall(cjson.decode, body)
	assert.is_true(ok, "not JSON: " .. body)
	return rec, body
end

local every = {}
for b = 0, 255 do every[#every + 1] = string.char(b) end
every = table.concat(every)

describe("core log lines", function()
	it("json: time, level, projection, position, stream, version, message, in that order, absent ones left out", function()
		local rec, body = json("warn", "balances", "caught up", { position = 120, stream = "account-7", version = 3 })
		assert.same({ "time", "level", "projection", "position", "stream", "version", "message" },
			(function()
				local keys = {}
				for k in body:gmatch('"(%w+)":') do keys[#keys + 1] = k end
				return keys
			end)())
		assert.matches("^" .. TS .. "$", rec.time)
		assert.same({ level = "warn", projection = "balances", position = 120, stream = "account-7", version = 3,
			message = "caught up", time = rec.time }, rec)
		assert.matches('"position":120,', body, 1, true)
		assert.matches('"version":3,', body, 1, true)

		rec, body = json("info", "balances", "loaded")
		assert.same({ time = rec.time, level = "info", projection = "balances", message = "loaded" }, rec)
		assert.is_nil(body:find("null", 1, true))
		rec = json("error", "p", "m", {})
		assert.same({ time = rec.time, level = "error", projection = "p", message = "m" }, rec)
		rec = json("debug", "p", "m", { version = 0 })
		assert.same({ time = rec.time, level = "debug", projection = "p", version = 0, message = "m" }, rec)
	end)

	it("json: the process's own lines say process, not projection", function()
		for _, who in ipairs({ "host", "worker" }) do
			local rec = json("info", who, "listening")
			assert.equal(who, rec.process)
			assert.is_nil(rec.projection)
		end
		assert.equal("host", json("info", nil, "x").process)
		assert.equal("hostess", json("info", "hostess", "x").projection)
	end)

	it("json: integers are written as integers, whole range", function()
		for _, case in ipairs({
			{ 0, "0" }, { 1, "1" }, { -1, "-1" }, { 2 ^ 53, "9007199254740992" },
			{ 2 ^ 62, "4611686018427387904" }, { -2 ^ 63, "-9223372036854775808" },
			{ 1e15, "1000000000000000" }, { 2147483648, "2147483648" },
		}) do
			local _, body = json("info", "p", "m", { position = case[1], version = case[1] })
			assert.matches('"position":' .. case[2] .. ',', body, 1, true)
			assert.matches('"version":' .. case[2] .. ',', body, 1, true)
		end
	end)

	it("rejects fields that are not what they say (a programmer error), and runs no metatable", function()
		for _, bad in ipairs({ 1.5, 0 / 0, math.huge, -math.huge, 2 ^ 63, "12", true, {} }) do
			assert.has_error(function() core.log_line("info", "p", "m", { position = bad }) end)
			assert.has_error(function() core.log_line("info", "p", "m", { version = bad }) end)
		end
		for _, bad in ipairs({ 12, true, {} }) do
			assert.has_error(function() core.log_line("info", "p", "m", { stream = bad }) end)
		end
		assert.has_error(function() core.log_line("info", "p", "m", "fields") end)
		assert.has_error(function() core.log_line("info", "p", "m", nil, "xml") end)
		assert.has_error(function() core.log_format("JSON") end)
		local touched = false
		local f = setmetatable({}, { __index = function() touched = true; return 7 end })
		local rec = json("info", "p", "m", f)
		assert.is_false(touched)
		assert.is_nil(rec.position)
	end)

	it("json: any byte in any field still gives valid JSON; invalid UTF-8 becomes U+FFFD, the rest is kept exactly", function()
		local expect = every:sub(1, 128) .. FFFD:rep(128)
		local rec = json("info", every, every, { stream = every, position = 1, version = 2 })
		assert.equal(expect, rec.message)
		assert.equal(expect, rec.stream)
		-- a projection name gets 384 bytes of the line (log.h): this one, in
		-- its escaped form, needs more and is cut at a character
		assert.equal(expect:sub(1, #rec.projection), rec.projection)
		assert.is_true(#rec.projection > 200)
		assert.equal(every:sub(1, 128), json("info", every:sub(1, 128), "m").projection)
		-- a tab, a newline, quotes, backslashes, JSON of its own
		local s = 'a\tb\nc\r"d"\\e\\"}{"level":"error"\\u0000\0'
		rec = json("info", s, s, { stream = s })
		assert.equal(s, rec.message)
		assert.equal(s, rec.stream)
		assert.equal(s, rec.projection)
	end)

	it("json: well-formed UTF-8 is kept, ill-formed bytes each become one U+FFFD", function()
		for _, case in ipairs({
			{ "caf\195\169 \240\159\152\128 \239\191\189", "caf\195\169 \240\159\152\128 \239\191\189" },
			{ "\194\128\194\133\194\159", "\194\128\194\133\194\159" }, -- C1 controls: escaped, kept
			{ "\226\128\168\226\128\169", "\226\128\168\226\128\169" }, -- U+2028/9: escaped, kept
			{ "\244\143\191\191", "\244\143\191\191" }, -- U+10FFFF
			{ "\192\175", FFFD:rep(2) }, -- overlong '/'
			{ "\224\128\175", FFFD:rep(3) }, -- overlong, 3 bytes
			{ "\240\128\128\175", FFFD:rep(4) }, -- overlong, 4 bytes
			{ "\237\160\128", FFFD:rep(3) }, -- a surrogate (U+D800)
			{ "\244\144\128\128", FFFD:rep(4) }, -- above U+10FFFF
			{ "\245\128", FFFD:rep(2) }, { "\255", FFFD }, { "\128", FFFD },
			{ "\226\130", FFFD:rep(2) }, -- cut short at the end
			{ "\226\130x", FFFD:rep(2) .. "x" }, -- cut short before ASCII
		}) do
			assert.equal(case[2], json("info", "p", case[1]).message, ("%q"):format(case[1]))
		end
		-- the controls are escaped, not raw, so a terminal tailing the log obeys none
		local _, body = json("info", "p", "\194\133\226\128\168\127\27[31m")
		assert.matches("\\u0085\\u2028\\u007f\\u001b[31m", body, 1, true)
		assert.is_nil(body:find("\194\133", 1, true))
	end)

	it("json: a long record is cut inside its message, at a character, and stays one valid object", function()
		local stream = ('"\\\194\133'):rep(1024):sub(1, 1024) -- the longest, most escaped stream name
		for _, unit in ipairs({ "a", '"', "\1", "\226\128\168", "\255", "\240\159\152\128" }) do
			local msg = unit:rep(3000)
			local line = core.log_line("error", ("p"):rep(128), msg, { stream = stream, position = -2 ^ 63,
				version = -2 ^ 63 }, "json")
			assert.is_true(#line <= 4096, #line)
			local rec = json("error", ("p"):rep(128), msg, { stream = stream, position = -2 ^ 63, version = -2 ^ 63 })
			assert.equal(stream, rec.stream)
			assert.equal(("p"):rep(128), rec.projection)
			assert.equal(-2 ^ 63, rec.position)
			assert.is_true(#rec.message > 100, #rec.message)
			local want = (unit == "\255" and FFFD or unit)
			assert.equal(want:rep(#rec.message / #want), rec.message)
		end
		-- absurd names (not a projection's or a stream append accepts) are cut, never the line
		local huge = ('"\1'):rep(5000)
		local rec = json("info", huge, huge, { stream = huge })
		assert.equal(huge:sub(1, #rec.stream), rec.stream)
		assert.is_true(#core.log_line("info", huge, huge, { stream = huge }, "json") <= 4096)
	end)

	it("text: the line it always was; the position as pos=N, stream and version not shown", function()
		local line = core.log_line("info", "balances", "caught up", { position = 120, stream = "a-1", version = 3 }, "text")
		assert.matches("^" .. TS .. " INFO  balances pos=120 caught up\n$", line)
		assert.matches("^" .. TS .. " WARN  host listening\n$", core.log_line("warn", nil, "listening", nil, "text"))
		assert.matches("^" .. TS .. " ERROR p a\\tb\\nc\\\\ \\x1b\\xc2\\x85 \255\n$",
			core.log_line("error", "p", "a\tb\nc\\ \27\194\133 \255", {}, "text"))
		local long = core.log_line("info", "p", ("x"):rep(5000), { position = 1 }, "text")
		assert.equal(2048, #long)
		-- the process's format is the default
		local was = core.log_format()
		finally(function() core.log_format(was) end)
		assert.equal("text", core.log_format("text"))
		assert.equal(core.log_line("info", "p", "m", nil, "text"):sub(25), core.log_line("info", "p", "m"):sub(25))
		assert.equal("json", core.log_format("json"))
		assert.equal("json", core.log_format())
		assert.equal("{", core.log_line("info", "p", "m"):sub(1, 1))
	end)

	it("the worker's fields of an event keep only what the store gives, and never run a metatable", function()
		local session = require "projhost.worker.session"
		assert.same({ position = 7, stream = "a-1", version = 2 },
			session.event_fields({ position = 7, stream = "a-1", version = 2, type = "X" }))
		-- a handler may have changed its e: the line loses the field, the call never fails
		for _, bad in ipairs({ "7", 1.5, 0 / 0, math.huge, 2 ^ 63, {}, true }) do
			local f = session.event_fields({ position = bad, stream = bad, version = bad })
			assert.same(type(bad) == "string" and { stream = bad } or {}, f)
			assert.equal("{", core.log_line("info", "p", "m", f, "json"):sub(1, 1))
		end
		local touched = false
		local e = setmetatable({}, { __index = function() touched = true; return 1 end })
		assert.same({}, session.event_fields(e))
		assert.is_false(touched)
		assert.is_nil(session.event_fields(nil))
		assert.is_nil(session.event_fields("e"))
	end)
end)
