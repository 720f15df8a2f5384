-- The master/worker messages (core/proto.c and lua/projhost/wire.lua):
-- the C checks, and each side parsing what the other one wrote.
local h = require "helpers"
local wire = require "projhost.wire"

local dir = h.bin:find("build%-asan") and "build-asan" or "build"
local prog = h.root .. "/" .. dir .. "/proto_test"

local every = {}
for b = 1, 255 do every[b] = string.char(b) end
every = table.concat(every)

local function hex(s)
	return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local function run(args, input)
	local cmd = prog .. " " .. args .. " 2>&1"
	local tmp
	if input then
		tmp = h.write_file(h.tmpdir() .. "/in", input)
		cmd = cmd .. " < " .. tmp
	end
	local p = io.popen(cmd .. "; echo \"exit=$?\"")
	local out = p:read("*a")
	p:close()
	return out
end

describe("core proto", function()
	it("passes its C checks", function()
		local out = run("")
		assert.matches("exit=0", out, 1, true)
		local oks = 0
		for line in out:gmatch("[^\n]+") do
			if line:match("^ok ") then oks = oks + 1 end
		end
		assert.equal(3, oks, out)
	end)

	it("escapes and unescapes every byte in Lua as C does", function()
		for b = 1, 255 do
			local c = string.char(b)
			local e = wire.escape(c)
			assert.is_nil(e:find("[\t\n]"))
			assert.equal(c, wire.unescape(e))
		end
		for _, s in ipairs({ every, "\\t", "\\n", "\\\\", "\\", "a\\", "\\x", "" }) do
			assert.equal(s, wire.unescape(wire.escape(s)))
		end
		assert.equal("a\\qb\\", wire.unescape("a\\qb\\"))
	end)

	it("C parses every field the worker writes", function()
		local msg = table.concat({
			wire.line("proj", every, "stream", every, "1", "30", every),
			wire.line("error", every, ""),
			wire.line("ready"),
			wire.line("done", every, 7),
			wire.line("part", every, "idle", "0.000"),
			wire.line("part", ""),
			wire.line("found", "p", "more", every),
			wire.line("relist"),
		}, "\n")
		local e = "=" .. hex(every)
		assert.equal(table.concat({
			"proj " .. e .. " =" .. hex("stream") .. " " .. e .. " =31 =3330 " .. e,
			"error " .. e .. " =",
			"ready",
			"done " .. e .. " =37",
			"part " .. e .. " =" .. hex("idle") .. " =" .. hex("0.000"),
			"part =",
			"found =70 =" .. hex("more") .. " " .. e,
			"relist",
			"exit=0",
		}, "\n") .. "\n", run("parse", msg))
	end)

	it("Lua parses every field the master writes", function()
		local out = run("sample")
		out = out:gsub("exit=0\n$", "")
		assert.same({
			{ "job", every, "", every },
			{ "overrun", "42", "sql", every, "2147483647" },
		}, wire.parse(out))
	end)
end)
