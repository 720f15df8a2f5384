-- The projection sandbox against a hostile script: bytecode, string.dump,
-- the VM-wide metatables (strings, events, pages), and the shared JSON
-- instance. Each case is something a script could otherwise use to reach
-- outside its file or into another projection.
local loader = require "projhost.loader"
local P = require "projhost.projection"
local cjson = require "cjson"

local function tmpname(suffix)
	local p = os.tmpname()
	os.remove(p)
	return p .. suffix
end

local function write(path, text)
	local f = assert(io.open(path, "wb"))
	f:write(text)
	f:close()
end

local function read(path)
	local f = assert(io.open(path, "rb"))
	local s = f:read("*a")
	f:close()
	return s
end

-- Source text compiled with Debian's luajit -b, as an attacker would ship it.
local function bytecode_of(source)
	local src, out = tmpname(".lua"), tmpname(".luac")
	write(src, source)
	local rc = os.execute("luajit -b '" .. src .. "' '" .. out .. "'")
	assert(rc == 0 or rc == true, "luajit -b failed")
	local bc = read(out)
	os.remove(src)
	os.remove(out)
	return bc
end

-- What the loader's print produced while fn ran.
local function printed(fn)
	local got = {}
	local saved = loader.log_fn
	loader.log_fn = function(_, msg) got[#got + 1] = msg end
	local ok, a, b = pcall(fn)
	loader.log_fn = saved
	assert(ok, a)
	return got, a, b
end

local VALID = [[print("ran")
return { from = { all = true }, when = { A = function() end } }]]

local function def_of(source)
	return assert(loader.load_source(source, "p.lua"))
end

describe("sandbox", function()
	describe("bytecode", function()
		local bc = bytecode_of(VALID)

		it("is what luajit -b writes (the test input is real)", function()
			assert.equal("\27LJ", bc:sub(1, 3))
		end)

		it("is refused from a file, and nothing of it runs", function()
			local path = tmpname(".lua")
			write(path, bc)
			local logs, def, err = printed(function() return loader.load_file(path) end)
			os.remove(path)
			assert.is_nil(def)
			assert.equal(path .. ": bytecode is not accepted", err)
			assert.same({}, logs)
		end)

		it("is refused from source text, also after a #! line", function()
			for _, text in ipairs({ bc, "#!/usr/bin/projhost\n" .. bc, "\27", "\27 return {}",
				"#!\n\27LJ" }) do
				local logs, def, err = printed(function() return loader.load_source(text, "b.lua") end)
				assert.is_nil(def)
				assert.equal("b.lua: bytecode is not accepted", err)
				assert.same({}, logs)
			end
		end)

		it("is refused when corrupted (it would crash the VM if loaded)", function()
			local bad = bc:sub(1, 5) .. ("\255"):rep(#bc - 5)
			local def, err = loader.load_source(bad, "c.lua")
			assert.is_nil(def)
			assert.equal("c.lua: bytecode is not accepted", err)
		end)

		it("is refused among other files, which still load", function()
			local dir = tmpname("")
			assert(os.execute("mkdir '" .. dir .. "'"))
			write(dir .. "/a.lua", bc)
			write(dir .. "/b.lua", VALID)
			local logs, defs, errors = printed(function() return loader.load_paths({ dir }) end)
			os.execute("rm -rf '" .. dir .. "'")
			assert.equal(1, #defs)
			assert.equal("b", defs[1].name)
			assert.same({ dir .. "/a.lua: bytecode is not accepted" }, errors)
			assert.same({ "ran" }, logs) -- b's print only
		end)

		it("leaves a #! line of a source file alone (lines stay right)", function()
			local def, err = loader.load_source("#!/usr/bin/env projhost\nlocal x = nil + 1", "s.lua")
			assert.is_nil(def)
			assert.matches("^s%.lua:2: ", err)
		end)
	end)

	describe("string.dump", function()
		it("is not in the string library", function()
			local d = def_of([[
				local found = string.dump
				return { from = { all = true }, when = { A = function() return { found = found ~= nil } end } }
			]])
			assert.same({ found = false }, d.when.A({}, {}))
		end)

		it("is not reachable as a string method", function()
			local d = def_of([[
				return { from = { all = true }, when = { A = function()
					return { dot = ("").dump ~= nil, colon = pcall(function() return ("x"):dump() end),
						idx = ("")["dump"] ~= nil }
				end } }
			]])
			assert.same({ dot = false, colon = false, idx = false }, d.when.A({}, {}))
		end)

		it("is gone from string methods for the whole host once a sandbox exists", function()
			def_of(VALID)
			assert.is_nil(("").dump)
			assert.is_function(string.dump)
		end)

		it("cannot be put back through the string metatable", function()
			local d = def_of([[
				return { from = { all = true }, when = { A = function()
					return { mt = getmetatable("") == nil, mt2 = getmetatable("x") == nil }
				end } }
			]])
			assert.same({ mt = true, mt2 = true }, d.when.A({}, {}))
			local def, err = loader.load_source([[("").__index.dump = 1 return {}]], "x.lua")
			assert.is_nil(def)
			assert.matches("^x%.lua:1: attempt to index", err)
		end)

		it("changing the file's string table does not change string methods", function()
			local d = def_of([[
				string.upper = function() return "hacked" end
				string.dump = function() return "dumped" end
				return { from = { all = true }, when = { A = function() end } }
			]])
			assert.truthy(d)
			assert.equal("ABC", ("abc"):upper())
			assert.is_nil(("").dump)
		end)
	end)

	describe("the event metatable", function()
		local lazy_calls
		before_each(function()
			lazy_calls = 0
			P.set_lazy(function(e, k)
				lazy_calls = lazy_calls + 1
				if k == "data" then return { secret = rawget(e, "_row") } end
			end)
		end)
		after_each(function() P.set_lazy(nil) end)

		it("loads lazy fields through the loader the worker sets, once", function()
			local e = P.event({ position = 1, _row = 7 })
			assert.same({ secret = 7 }, e.data)
			assert.same({ secret = 7 }, e.data)
			assert.equal(1, lazy_calls)
			assert.is_nil(e.metadata)
		end)

		it("is hidden from getmetatable and cannot be replaced or patched", function()
			local d = def_of([[
				return { from = { all = true }, when = { A = function(s, e)
					local mt = getmetatable(e)
					local ok = pcall(setmetatable, e, {})
					local patched = pcall(function() getmetatable(e).__index = function() return "forged" end end)
					return { mt = tostring(mt), set = ok, patched = patched }
				end } }
			]])
			local e = P.event({ position = 1, _row = 1 })
			assert.same({ mt = "false", set = false, patched = false }, d.when.A({}, e))
			local other = P.event({ position = 2, _row = 2 })
			assert.same({ secret = 2 }, other.data)
		end)

		it("is still recognized by the host (plain copy for JSON)", function()
			-- a userdata field (the worker's _page) makes the plain copy necessary
			local e = P.event({ position = 3, version = 1, stream = "s-1", type = "T", _row = 3, _page = io.stderr })
			local ok, text = P.encode({ e = e })
			assert.is_true(ok)
			local back = cjson.decode(text)
			assert.equal(3, back.e.position)
			assert.same({ secret = 3 }, back.e.data)
		end)
	end)

	describe("the page and connection metatables (core/bindings/lua_pg.c)", function()
		local reg = debug.getregistry()
		require "projhost.core"

		for _, name in ipairs({ "projhost.page", "projhost.conn" }) do
			it(name .. " is hidden from getmetatable and its methods are not the metatable", function()
				local mt = reg[name]
				assert.is_table(mt)
				-- getmetatable(userdata) returns this field instead of mt
				assert.is_false(mt.__metatable)
				assert.is_table(mt.__index)
				assert.not_equal(mt, mt.__index)
				-- so a script cannot call __gc (free the result under the other events)
				assert.is_nil(mt.__index.__gc)
				assert.is_nil(mt.__index.__metatable)
			end)
		end
	end)

	describe("json", function()
		it("is the host's configuration: 14 digits and sparse arrays as objects", function()
			local d = def_of([[
				return { from = { all = true }, when = { A = function()
					return { n = json.encode({ 0.1 + 0.2 }), sparse = json.encode({ [1] = 1, [1000] = 2 }),
						null = json.decode("[null]")[1] == json.null }
				end } }
			]])
			local r = d.when.A({}, {})
			assert.equal(P.json.encode({ 0.1 + 0.2 }), r.n)
			assert.equal("[0.3]", r.n)
			assert.equal(P.json.encode({ [1] = 1, [1000] = 2 }), r.sparse)
			assert.is_true(r.null)
		end)

		it("does not let a script change the shared settings", function()
			local before = P.json.encode({ 1 / 3 })
			local def, err = loader.load_source([[
				json.encode_number_precision(3)
				return {}
			]], "j.lua")
			assert.is_nil(def)
			assert.matches("^j%.lua:1: ", err)
			for _, f in ipairs({ "encode_number_precision", "encode_sparse_array", "encode_max_depth",
				"decode_max_depth", "encode_keep_buffer", "encode_invalid_numbers", "decode_invalid_numbers",
				"new" }) do
				local d = def_of("local x = json." .. f .. "\nreturn { from = { all = true }, when = { A = function() return { x = x ~= nil } end } }")
				assert.same({ x = false }, d.when.A({}, {}))
			end
			assert.equal(before, P.json.encode({ 1 / 3 }))
		end)

		it("gives each file its own json table", function()
			local a = def_of([[json.encode = function() return "x" end
				return { from = { all = true }, when = { A = function() return { s = json.encode({}) } end } }]])
			local b = def_of([[return { from = { all = true }, when = { A = function() return { s = json.encode({ 1 }) } end } }]])
			assert.same({ s = "x" }, a.when.A({}, {}))
			assert.same({ s = "[1]" }, b.when.A({}, {}))
		end)

		it("encodes events as the host stores them", function()
			P.set_lazy(function(_, k) if k == "data" then return { v = 1 } end end)
			local d = def_of([[return { from = { all = true }, when = { A = function(s, e)
				return { s = json.encode({ e = e }) } end } }]])
			local r = d.when.A({}, P.event({ position = 1, stream = "s", type = "A", _page = io.stderr }))
			P.set_lazy(nil)
			assert.equal(1, cjson.decode(r.s).e.data.v)
		end)
	end)
end)
