-- PROJHOST_LOG_FORMAT=json on a real PostgreSQL: every line a host writes
-- (master, workers, the CLI's own) is one JSON object, whatever bytes a
-- handler prints or a stream name holds; position, stream and version are
-- fields of their own, not text to parse back out of the message. The
-- default stays the text format, byte for byte.
local h = require "helpers"
local cjson = require "cjson"
local core = require "projhost.core"

-- Valid UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above
-- U+10FFFF. cjson does not check this; a log shipper may.
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
		else return false, i end
		for k = 1, len - 1 do
			local b = s:byte(i + k)
			if not b then return false, i end
			if k == 1 and (b < lo or b > hi) then return false, i end
			if k > 1 and (b < 0x80 or b > 0xBF) then return false, i end
		end
		i = i + len
	end
	return true
end

-- Every line of out as a decoded record; fails on the first that is not
-- one JSON object of valid UTF-8 with time, level and message.
local function records(out)
	local list = {}
	for line in out:gmatch("([^\n]*)\n") do
		local ok, at = utf8_valid(line)
		assert.is_true(ok, ("invalid UTF-8 at byte %s of %q"):format(tostring(at), line))
		local okd, rec = pcall(cjson.decode, line)
		assert.is_true(okd, "not JSON: " .. line)
		assert.equal("table", type(rec), line)
		assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", rec.time, 1, false, line)
		assert.truthy(({ debug = true, info = true, warn = true, error = true })[rec.level], line)
		assert.equal("string", type(rec.message), line)
		for k, v in pairs(rec) do
			assert.are_not.equal(cjson.null, v, "field " .. k .. " is null: " .. line)
		end
		list[#list + 1] = rec
	end
	assert.equal("", out:gsub("[^\n]*\n", ""), "a last line without its newline")
	return list
end

-- A stream name with every awkward thing append lets through: quotes,
-- backslashes, JSON-looking text, a C1 control (U+0085), U+2028, an emoji.
local STREAM = 'odd-"q"\\x\\u0000{"a":1}\194\133\226\128\168\240\159\152\128'
-- what the handler prints: a tab, a newline, a quote, a backslash, an
-- invalid UTF-8 byte, a lone continuation byte, a truncated sequence, an
-- overlong slash and an encoded surrogate
local PRINTED = 'tab\there\nline "quoted" back\\slash bad\255 cont\128 cut\226\130 over\192\175 sur\237\160\128 end'
-- ...and how JSON carries it: each invalid byte becomes U+FFFD
local FFFD = "\239\191\189"
local PRINTED_JSON = ('tab\there\nline "quoted" back\\slash bad%s cont%s cut%s%s over%s%s sur%s%s%s end')
	:format(FFFD, FFFD, FFFD, FFFD, FFFD, FFFD, FFFD, FFFD, FFFD)

local PROBE = [[
return {
	name = "probe",
	from = { category = "odd" },
	when = {
		Said = function(s, e, ctx)
			print(]] .. ("%q"):format(PRINTED):gsub("\\\n", "\\n") .. [[)
			ctx:log("ctx", "log")
		end,
		Bad = function() error("no\tgood", 0) end,
	},
	on_error = function() return "park" end,
}
]]

describe("PROJHOST_LOG_FORMAT", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("logs")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		h.write_file(dir .. "/probe.lua", PROBE)
		local code, _, err = h.run({ "append", STREAM, "Said", "{}", "--db", dsn })
		assert.equal(0, code, err)
		code, _, err = h.run({ "append", STREAM, "Said", "{}", "--db", dsn })
		assert.equal(0, code, err)
		code, _, err = h.run({ "append", STREAM, "Bad", "{}", "--db", dsn })
		assert.equal(0, code, err)
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	local function event(version)
		local rows = assert(conn:query([[SELECT global_position::text AS p FROM projhost.events
			WHERE stream_id = $1 AND stream_version = $2]], STREAM, version))
		return tonumber(rows[1].p)
	end

	it("json: every line of a host is a JSON object; a handler's lines carry projection, position, stream, version",
		function()
			local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_LOG_FORMAT = "json" } })
			assert.equal(0, code, out .. err)
			assert.equal("", out)
			local recs = records(err)
			local printed, logged, master = {}, {}, 0
			for _, r in ipairs(recs) do
				if r.projection == "probe" and r.stream and r.level ~= "error" then
					assert.equal(STREAM, r.stream)
					assert.equal("info", r.level)
					if r.message:find("ctx log", 1, true) then
						assert.equal("ctx log", r.message)
						logged[#logged + 1] = r
					else
						assert.equal(dir .. "/probe.lua: " .. PRINTED_JSON, r.message)
						printed[#printed + 1] = r
					end
				end
				if r.process == "host" and r.message:match("^serving 1 projection") then master = master + 1 end
				-- no text prefix is left in a message: position is a field
				assert.is_nil(r.message:match("pos="), r.message)
			end
			assert.equal(1, master, err)
			-- the batch runs again after the failure of event 3 rolled it
			-- back, so each event prints once or more
			for _, list in ipairs({ printed, logged }) do
				local seen = {}
				for _, r in ipairs(list) do
					assert.equal(event(r.version), r.position)
					seen[r.version] = true
				end
				assert.same({ true, true }, seen, err)
			end
			assert.is_nil(err:find('"position":%d+[%.eE]'))
			assert.is_nil(err:find('"version":%d+[%.eE]'))
			-- the lines that say where a projection is have it as a field too
			local caught
			for _, r in ipairs(recs) do
				if r.projection == "probe" and r.message == "caught up" then caught = r end
			end
			assert.is_table(caught, err)
			assert.equal(event(3), caught.position)
			assert.is_nil(caught.stream)
			assert.is_nil(caught.version)
			-- a handler's failure: the event's fields, the message as text has it
			local failed
			for _, r in ipairs(recs) do
				if r.level == "error" and r.projection == "probe" then failed = r end
			end
			assert.is_table(failed, err)
			assert.same({ time = failed.time, level = "error", projection = "probe", position = event(3),
				stream = STREAM, version = 3,
				message = "event " .. STREAM .. "@3 (Bad) failed (attempt 1): no\tgood -> park" }, failed)
		end)

	it("text (the default) is the line format it always was", function()
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_LOG_FORMAT = false } })
		assert.equal(0, code, out .. err)
		local ts = "%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ "
		local esc = core.escape(dir .. "/probe.lua: " .. PRINTED)
		for v = 1, 2 do
			local p = event(v)
			assert.matches("\n" .. ts .. "INFO  probe pos=" .. p .. " " .. esc:gsub("%p", "%%%0") .. "\n",
				"\n" .. err, 1, false)
			assert.matches("\n" .. ts .. "INFO  probe pos=" .. p .. " ctx log\n", "\n" .. err, 1, false)
		end
		assert.matches("\n" .. ts .. "INFO  probe pos=" .. event(3) .. " caught up\n", "\n" .. err, 1, false)
		local failed = core.escape("event " .. STREAM .. "@3 (Bad) failed (attempt 1): no\tgood -> park")
		assert.matches("\n" .. ts .. "ERROR probe pos=" .. event(3) .. " " .. failed:gsub("%p", "%%%0") .. "\n",
			"\n" .. err, 1, false)
		assert.matches("\n" .. ts .. "INFO  host serving 1 projection", "\n" .. err, 1, false)
		for line in err:gmatch("[^\n]+") do assert.matches("^" .. ts, line) end
	end)

	it("json: a warning about another variable's value is a JSON record too", function()
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir },
			{ env = { PROJHOST_LOG_FORMAT = "json", PROJHOST_BATCH_SIZE = 'many"\n' } })
		assert.equal(0, code, out .. err)
		local said
		for _, r in ipairs(records(err)) do
			if r.message:find("PROJHOST_BATCH_SIZE", 1, true) then said = r end
		end
		assert.is_table(said, err)
		assert.equal("warn", said.level)
		assert.matches('^PROJHOST_BATCH_SIZE=many"\n is not valid %(.+%); using 1000$', said.message)
	end)

	it("a value that is neither text nor json is said on stderr and text is used", function()
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_LOG_FORMAT = "JSON5" } })
		assert.equal(0, code, out .. err)
		assert.matches("projhost: PROJHOST_LOG_FORMAT=JSON5 is not valid", err, 1, true)
		assert.matches("INFO  probe pos=" .. event(3) .. " caught up", err, 1, true)
	end)
end)
