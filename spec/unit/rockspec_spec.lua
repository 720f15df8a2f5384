-- The rockspec is part of the contract (design §6): luarocks accepts it and
-- it installs every module of the library.
describe("projhost-scm-1.rockspec", function()
	local function load_rockspec()
		local env = {}
		local chunk = assert(loadfile("projhost-scm-1.rockspec"))
		setfenv(chunk, env)
		chunk()
		return env
	end

	it("passes luarocks lint", function()
		local ok = os.execute("luarocks lint projhost-scm-1.rockspec >/dev/null 2>&1")
		assert.is_true(ok == 0 or ok == true)
	end)

	it("is format 3.0 with a busted test section and the C module", function()
		local r = load_rockspec()
		assert.equal("3.0", r.rockspec_format)
		assert.equal("busted", r.test.type)
		assert.is_table(r.build.modules["projhost.core"])
		assert.is_table(r.external_dependencies.LIBPQ)
		assert.is_table(r.external_dependencies.LIBUV)
	end)

	it("lists every Lua module and every C source the Makefile builds the module from", function()
		local r = load_rockspec()
		local p = io.popen("find lua/projhost -name '*.lua' | sort")
		for path in p:lines() do
			local name = path:match("lua/projhost/(.-)%.lua$"):gsub("/init$", ""):gsub("/", ".")
			local mod = name == "init" and "projhost" or "projhost." .. name
			assert.equal(path, r.build.modules[mod], "rockspec does not install " .. mod)
		end
		p:close()
		local mk = io.open("Makefile"):read("*a")
		local srcs = mk:match("LIB_SRCS%s*:=%s*(.-)\n[^\t ]")
		local listed = {}
		for _, s in ipairs(r.build.modules["projhost.core"].sources) do listed[s] = true end
		for s in srcs:gmatch("core/[%w_/]+%.c") do
			assert.is_true(listed[s] == true, "rockspec misses " .. s)
		end
	end)
end)
