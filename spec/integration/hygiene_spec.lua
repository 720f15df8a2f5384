-- One log record is one line, and tables for people never carry control
-- characters raw (issue 10, "Hygiene"): ph_log escapes \n \t \r, other C0
-- and DEL (\xNN), C1 in UTF-8 (\xC2\xNN) and the backslash itself in every
-- part it writes; core.escape exposes the same rule to Lua.
local h = require "helpers"
local core = require "projhost.core"
local cjson = require "cjson"
local schema = require "projhost.schema"

local PREFIX = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ (%u+) +"

-- Run Lua code in a child host (through `projhost test`, so it runs inside
-- the real binary with the real core.log) and return its stderr lines.
local function log_lines_of(code, env)
	local dir = h.tmpdir()
	h.write_file(dir .. "/log_spec.lua", "local core = require 'projhost.core'\n"
		.. "it('logs', function()\n" .. code .. "\nend)\n")
	local rc, out, err = h.run({ "test", dir .. "/log_spec.lua" }, { cwd = h.root, env = env })
	assert.equal(0, rc, out .. err)
	local lines = {}
	for l in err:gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
	assert.equal("\n", err:sub(-1), "stderr ends with a newline")
	return lines, err
end

-- Does s end in the middle of a UTF-8 sequence?
local function cut_utf8(s)
	local i = #s
	local back = 0
	while i > 0 and s:byte(i) >= 0x80 and s:byte(i) < 0xC0 do
		i, back = i - 1, back + 1
	end
	local lead = i > 0 and s:byte(i) or 0
	if lead < 0xC0 then return back > 0 end
	local need = lead >= 0xF0 and 3 or lead >= 0xE0 and 2 or 1
	return back ~= need
end

-- Is s made of whole escapes (and plain bytes) only, none cut at its end?
local function whole_escapes(s)
	local i = 1
	while i <= #s do
		if s:sub(i, i) == "\\" then
			local nxt = s:sub(i + 1, i + 1)
			if nxt:match("^[ntr\\]$") then
				i = i + 2
			elseif s:sub(i + 1, i + 3):match("^x%x%x$") then
				i = i + 4
			else
				return false
			end
		else
			i = i + 1
		end
	end
	return true
end

describe("core.escape", function()
	it("escapes C0, DEL, C1 and the backslash, and nothing else", function()
		assert.equal("a\\nb\\tc\\rd\\x1b[31m\\x00\\x7f\\x01\\x1f\\\\n", core.escape("a\nb\tc\rd\27[31m\0\127\1\31\\n"))
		assert.equal("\\xc2\\x9b2J \194\160 é € 😀 \255", core.escape("\194\1552J \194\160 é € 😀 \255"))
		assert.equal("plain text, 'quotes' \"too\"", core.escape("plain text, 'quotes' \"too\""))
		assert.equal("", core.escape(""))
	end)

	it("cuts at max bytes without splitting an escape or a UTF-8 character", function()
		assert.equal("ab", core.escape("ab\ncd", 3))
		assert.equal("ab\\n", core.escape("ab\ncd", 4))
		assert.equal("ab\\nc", core.escape("ab\ncd", 5))
		assert.equal("a", core.escape("a\27", 4))
		assert.equal("a\\x1b", core.escape("a\27", 5))
		assert.equal("x", core.escape("xé", 2))
		assert.equal("xé", core.escape("xé", 3))
		assert.equal("x", core.escape("x😀", 4))
		for max = 0, 40 do
			local s = core.escape(("é\n\27😀\\"):rep(4), max)
			assert.is_true(#s <= max)
			assert.is_true(whole_escapes(s), s)
			assert.is_false(cut_utf8(s), s)
		end
	end)

	it("refuses a non-string and a negative max (programmer errors)", function()
		assert.is_function(core.escape)
		assert.has_error(function() core.escape({}) end)
		assert.has_error(function() core.escape("x", -1) end)
		assert.has_error(function() core.escape("x", 0 / 0) end)
		assert.equal("\\n", core.escape("\n", math.huge))
		assert.equal("a", core.escape("ab", 1.5))
	end)
end)

describe("log lines", function()
	it("core.log writes one escaped line per record, also for the who field", function()
		local lines = log_lines_of([[
			core.log("info", "who\nINFO  forged", "a\nb\tc\27[31m end\r\\n \127 \0 nul")
			core.log("warn", nil, "second")
		]])
		assert.equal(2, #lines)
		local level, rest = lines[1]:match(PREFIX .. "(.*)$")
		assert.equal("INFO", level)
		assert.equal("who\\nINFO  forged a\\nb\\tc\\x1b[31m end\\r\\\\n \\x7f \\x00 nul", rest)
		assert.matches(PREFIX .. "host second$", lines[2])
	end)

	it("has debug records only with PROJHOST_DEBUG set (non-empty)", function()
		local code = [[core.log("debug", "d", "hidden?") core.log("info", "i", "shown")]]
		assert.equal(1, #log_lines_of(code))
		assert.equal(1, #log_lines_of(code, { PROJHOST_DEBUG = "" }))
		local lines = log_lines_of(code, { PROJHOST_DEBUG = "1" })
		assert.equal(2, #lines)
		assert.matches(PREFIX .. "d hidden%?$", lines[1])
	end)

	it("a message longer than a line is cut without splitting an escape or a character", function()
		local lines = log_lines_of([[
			for k = 1960, 2060 do
				core.log("info", "cut", ("x"):rep(k) .. ("\27"):rep(30))
				core.log("info", "cut", ("x"):rep(k) .. ("é"):rep(30))
				core.log("info", "cut", ("x"):rep(k) .. ("\\"):rep(30))
			end
			core.log("info", "cut", ("\n"):rep(5000))
		]])
		assert.equal(3 * 101 + 1, #lines)
		for i = 1, 3 * 101 do
			local l = lines[i]
			assert.matches(PREFIX .. "cut x+", l)
			assert.is_true(#l + 1 <= 2048, "a line fits the buffer")
			local tail = l:match("x+(.*)$")
			if i % 3 == 1 then
				assert.equal("", (tail:gsub("\\x1b", "")), tail)
			elseif i % 3 == 2 then
				assert.is_false(cut_utf8(l), tail)
			else
				assert.equal("", (tail:gsub("\\\\", "")), tail)
			end
		end
		local _, newlines = lines[#lines]:match(PREFIX .. "cut (.*)$")
		assert.equal("", (newlines:gsub("\\n", "")))
		assert.is_true(#newlines > 1900)
	end)

	describe("from projections", function()
		local dsn, conn, dir

		before_each(function()
			dsn = h.fresh_db("hygiene_run")
			conn = h.connect(dsn)
			assert(schema.migrate(conn))
			dir = h.tmpdir()
		end)

		after_each(function()
			h.stop_all()
			if conn then conn:close() end
		end)

		-- Every line on stderr is a log record of the host's format.
		local function assert_one_record_per_line(err)
			for l in err:gmatch("([^\n]*)\n") do
				assert.matches(PREFIX, l, 1, false, "not a log record: " .. l)
			end
		end

		it("ctx.log text and errors carrying event data stay one escaped line each", function()
			h.write_file(dir .. "/hyg.lua", [[
return {
	name = "hyg",
	from = { category = "hyg" },
	init = function() return {} end,
	when = {
		Note = function(s, e, ctx) ctx.log("a\nb\tc\27[31m " .. e.data.note) end,
		Boom = function(s, e, ctx) error("boom: " .. e.data.note, 0) end,
	},
	on_error = function() return "park" end,
}
]])
			local note = "x\n2026-01-01T00:00:00.000Z ERROR forged\27[2J"
			for _, t in ipairs({ "Note", "Boom" }) do
				local code, _, err = h.run({ "append", "hyg-1", t, cjson.encode({ note = note }), "--db", dsn })
				assert.equal(0, code, err)
			end
			local code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
			assert.equal(0, code, out .. err)
			assert_one_record_per_line(err)
			local esc = "x\\n2026-01-01T00:00:00.000Z ERROR forged\\x1b[2J"
			assert.truthy(err:find(" hyg pos=1 a\\nb\\tc\\x1b[31m " .. esc .. "\n", 1, true), err)
			-- the worker may log only the error's first line; either way it is one line
			assert.truthy(err:find("boom: x", 1, true), err)
			assert.equal(1, tonumber(h.scalar(conn, "SELECT count(*) FROM projhost.parked WHERE projection = 'hyg'")))
		end)

		-- print goes through loader.log_fn, which the worker routes to
		-- core.log with the projection and the event's position
		it("print output stays one escaped log line, naming the projection and the event", function()
			h.write_file(dir .. "/prt.lua", [[
return {
	name = "prt",
	from = { category = "prt" },
	init = function() return {} end,
	when = { ["*"] = function(s, e, ctx) print("a\nb\tc\27[31m", e.data.note) end },
}
]])
			local code, _, err = h.run({ "append", "prt-1", "P", '{"note": "x\\ny"}', "--db", dsn })
			assert.equal(0, code, err)
			local out
			code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
			assert.equal(0, code, out .. err)
			assert_one_record_per_line(err)
			assert.truthy(err:find("a\\nb\\tc\\x1b[31m x\\ny", 1, true), err)
			assert.matches("INFO  prt pos=1 [^\n]*prt%.lua: a\\nb", err)
		end)
	end)
end)

describe("tables for people", function()
	local dsn, conn
	local BAD = "s\n2026 ERROR forged\27[31m\tend"
	local SHOWN = "s\\n2026 ERROR forged\\x1b[31m\\tend"

	setup(function()
		dsn = h.fresh_db("hygiene_tables")
		conn = h.connect(dsn)
		assert(schema.migrate(conn))
		-- straight into the tables: whatever got there must print safely
		assert(conn:exec([[INSERT INTO projhost.checkpoints (projection, partition, version, status, error, last_pos)
			VALUES ('p' || chr(27) || '[1m', $1, 1, 'failed', $1, 0)]], BAD))
		assert(conn:exec([[INSERT INTO projhost.parked (projection, partition, global_position, stream_id,
			stream_version, event_type, error) VALUES ('p' || chr(27) || '[1m', $1, 1, $1, 1, $1, $1)]], BAD))
	end)

	teardown(function()
		if conn then conn:close() end
	end)

	local function assert_no_controls(out)
		-- newlines end the table's own rows; nothing else below 0x20, no DEL
		assert.is_nil(out:match("[%z\1-\9\11-\31\127]"), out)
	end

	it("status escapes names and errors; --json stays JSON with the true values", function()
		local code, out, err = h.run({ "status", "--db", dsn })
		assert.equal(0, code, err)
		assert_no_controls(out)
		assert.truthy(out:find("p\\x1b[1m", 1, true), out)
		assert.truthy(out:find((SHOWN .. ": " .. SHOWN):sub(1, 80), 1, true), out)
		code, out, err = h.run({ "status", "--json", "--db", dsn })
		assert.equal(0, code, err)
		assert_no_controls(out:sub(1, -2))
		local s = cjson.decode(out)
		assert.equal("p\27[1m", s.projections[1].name)
		assert.equal(BAD .. ": " .. BAD, s.projections[1].error)
	end)

	it("parked list escapes every cell", function()
		local code, out, err = h.run({ "parked", "list", "--db", dsn })
		assert.equal(0, code, err)
		assert_no_controls(out)
		assert.truthy(out:find(SHOWN .. "@1 " .. SHOWN, 1, true), out)
		assert.truthy(out:find("p\\x1b[1m", 1, true), out)
		assert.equal(2, select(2, out:gsub("\n", "\n")), "a header and one row")
	end)

	it("error lines of the CLI escape what they quote", function()
		local code, out, err = h.run({ "reset", "no\npe\27[31m", "--db", dsn })
		assert.equal(1, code)
		assert.equal("", out)
		assert.equal("projhost: reset: no projection named no\\npe\\x1b[31m (known: p\\x1b[1m)\n", err)
		code, out, err = h.run({ "parked", "skip", "p\27[1m", "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("skipped 1 parked event of p\\x1b[1m\n", out)
		code, out, err = h.run({ "frob\27[2J" })
		assert.equal(2, code)
		assert.matches("^projhost: unknown command 'frob\\x1b%[2J'\nusage:", err)
	end)
end)
