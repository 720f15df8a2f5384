-- The structure a maintainer relies on (issue 12): one home for each rule,
-- checked over the tree (run from the repository root, as `make test` does).
local core = require "projhost.core"

local function read(path)
	local f = assert(io.open(path, "rb"))
	local s = f:read("*a")
	f:close()
	return s
end

local function files(pattern)
	local out = {}
	local p = io.popen("ls " .. pattern .. " 2>/dev/null")
	for l in p:lines() do out[#out + 1] = l end
	p:close()
	return out
end

describe("the tree", function()
	it("has one FNV-1a, in core/fnv.h, with the standard offset basis", function()
		for _, path in ipairs(files("core/*.c core/*.h core/*/*.c core/*/*.h lua/projhost/*.lua lua/projhost/*/*.lua")) do
			if path ~= "core/fnv.h" then
				local s = read(path)
				-- the prime is in every FNV loop; either basis, mistyped or not
				assert.is_nil(s:find("1099511628211", 1, true), path .. " has its own FNV")
				assert.is_nil(s:find("146959810393466560", 1, true), path .. " has its own FNV basis")
			end
		end
		-- the published FNV-1a 64 test vectors
		assert.equal("cbf29ce484222325", core.hash(""))
		assert.equal("af63dc4c8601ec8c", core.hash("a"))
		assert.equal("85944171f73967e8", core.hash("foobar"))
	end)

	it("writes the version once, in core/version.h", function()
		local v = read("core/version.h"):match('#define PH_VERSION "([^"]+)"')
		assert.is_string(v)
		assert.equal(v, core.version)
		assert.equal(v, require("projhost").version)
		local literal = v:gsub("%p", "%%%0")
		for _, path in ipairs(files("core/*.c core/*.h core/*/*.c core/*/*.h lua/projhost/*.lua lua/projhost/*/*.lua")) do
			if path ~= "core/version.h" then
				assert.is_nil(read(path):find('"' .. literal .. '"'), path .. " writes the version itself")
			end
		end
	end)

	it("configures JSON once, in projhost.json", function()
		for _, path in ipairs(files("lua/projhost/*.lua lua/projhost/*/*.lua")) do
			if path ~= "lua/projhost/json.lua" then
				local s = read(path)
				assert.is_nil(s:find("require%s*%(?%s*[\"']cjson[\"']"), path .. " uses cjson directly")
			end
		end
		local json = require "projhost.json"
		assert.equal('{"1":1,"1000":2}', json.encode({ [1] = 1, [1000] = 2 }):gsub('{"1000":2,"1":1}', '{"1":1,"1000":2}'))
		assert.equal("12345678901234", json.encode(12345678901234))
	end)

	it("reads every PROJHOST_* variable in projhost.config, which documents each", function()
		local config = require "projhost.config"
		local readme = read("README.md")
		for _, path in ipairs(files("lua/projhost/*.lua lua/projhost/*/*.lua core/*.c core/bindings/*.c")) do
			local s = read(path)
			for name in s:gmatch("getenv%s*%(%s*\"(PROJHOST_[%w_]+)\"") do
				assert.is_true(path == "lua/projhost/config.lua" or (path == "core/bindings/main.c" and name == "PROJHOST_LUADIR"),
					path .. " reads " .. name .. " itself")
			end
			for name in s:gmatch("PROJHOST_[%u_]+") do
				assert.is_table(config.VARS[name], path .. " mentions " .. name .. ", which projhost.config does not know")
			end
		end
		for name, var in pairs(config.VARS) do
			assert.is_string(var[3], name .. " has no description")
			assert.truthy(readme:find("`" .. name .. "`", 1, true), "README does not list " .. name)
		end
	end)

	it("parses configuration values, falling back to the default on nonsense", function()
		local config = require "projhost.config"
		local function env(t) return function(k) return t[k] end end
		assert.equal(1000, config.read("PROJHOST_BATCH_SIZE", env {}))
		assert.equal(250, config.read("PROJHOST_BATCH_SIZE", env { PROJHOST_BATCH_SIZE = "250" }))
		for _, bad in ipairs({ "", "0", "-5", "2.5", "lots", "nan", "1e99" }) do
			assert.equal(1000, config.read("PROJHOST_BATCH_SIZE", env { PROJHOST_BATCH_SIZE = bad }), bad)
		end
		assert.equal(0.2, config.read("PROJHOST_POLL_INTERVAL", env { PROJHOST_POLL_INTERVAL = "0.2" }))
		assert.equal(5, config.read("PROJHOST_POLL_INTERVAL", env { PROJHOST_POLL_INTERVAL = "0" }))
		assert.equal(0, config.read("PROJHOST_BUDGET", env { PROJHOST_BUDGET = "0" }))
		assert.is_nil(config.read("PROJHOST_DB", env { PROJHOST_DB = "" }))
		assert.equal(".projhost", config.read("PROJHOST_HOME", env { PROJHOST_HOME = "" }))
		assert.is_true(config.read("PROJHOST_SYNCHRONOUS_COMMIT", env { PROJHOST_SYNCHRONOUS_COMMIT = "on" }))
		assert.is_false(config.read("PROJHOST_SYNCHRONOUS_COMMIT", env { PROJHOST_SYNCHRONOUS_COMMIT = "off" }))
		assert.has_error(function() config.read("PROJHOST_NOPE") end)
		-- nonsense is said, with the variable, the value and the default
		local said = {}
		local function note(t) said[#said + 1] = t end
		config.read("PROJHOST_BATCH_SIZE", env { PROJHOST_BATCH_SIZE = "lots\n" }, note)
		config.read("PROJHOST_BATCH_SIZE", env { PROJHOST_BATCH_SIZE = "" }, note)
		config.read("PROJHOST_BATCH_SIZE", env { PROJHOST_BATCH_SIZE = "7" }, note)
		assert.equal(1, #said)
		assert.matches("^PROJHOST_BATCH_SIZE=lots\n is not valid %(.+%); using 1000$", said[1])
	end)

	it("passes make lint (luacheck --std luajit lua/, cppcheck style and unused functions over core/)", function()
		local p = io.popen("make -s lint 2>&1; echo \"rc=$?\"")
		local out = p:read("*a")
		p:close()
		assert.truthy(out:find("rc=0\n$"), out)
	end)

	it("declares no libc in Lua: processes, modes and owners come from projhost.core", function()
		for _, path in ipairs(files("lua/projhost/*.lua lua/projhost/*/*.lua")) do
			local s = read(path)
			assert.is_nil(s:find("require%s*%(?%s*[\"']ffi[\"']"), path .. " uses the FFI")
			assert.is_nil(s:find("ffi%.cdef"), path .. " declares C")
		end
	end)

	it("has a process API that says what failed, luv style", function()
		local pid, msg, code = core.spawn("/nonexistent/program", {}, {}, {})
		assert.is_nil(pid)
		assert.equal("ENOENT", code)
		assert.is_string(msg)
		local dir = assert(core.tmpdir("/tmp/projhost-structure."))
		local out = dir .. "/out"
		pid = assert(core.spawn("/bin/sh", { "-c", "echo $X; echo err >&2; exit 3" }, { "X=1" },
			{ out = out, err = out, cwd = dir }))
		local rc, rss = core.wait(pid, 10)
		assert.equal(3, rc)
		assert.is_true(rss > 0)
		assert.equal("1\nerr\n", read(out))
		pid = assert(core.spawn("/bin/sleep", { "5" }, {}, {}))
		assert.is_nil((core.wait(pid, 0)))
		assert(core.kill(pid, 9))
		assert.equal(128 + 9, (core.wait(pid, 10)))
		local _, m2, c2 = core.wait(pid, 0) -- reaped already
		assert.is_string(m2)
		assert.equal("ECHILD", c2)
		assert.has_error(function() core.spawn("/bin/true", { 1 }, {}, {}) end)
		-- (" (deleted)": the binary was rebuilt while the suite ran)
		assert.matches("/projhost$", (core.exepath():gsub(" %(deleted%)$", "")))
		local ok, _, c3 = core.chmod(dir .. "/none", 420)
		assert.is_nil(ok)
		assert.equal("ENOENT", c3)
		_, _, c3 = core.chown(dir, "no-such-user-here")
		assert.equal("ENOENT", c3)
		local env = core.environ()
		assert.is_true(#env > 0)
		assert.is_string(env[1][1])
		os.remove(out)
		os.remove(dir)
	end)

	it("includes lua.h only in core/bindings/; the C subsystems know nothing of Lua or of the bindings", function()
		for _, path in ipairs(files("core/*.c core/*.h")) do
			local s = read(path)
			for inc in s:gmatch('#include%s*[<"]([^>"]+)[>"]') do
				assert.is_nil(inc:match("^lua") or inc:match("^lauxlib") or inc:match("^lualib") or inc:match("bindings/"),
					path .. " includes " .. inc)
			end
		end
		assert.same({}, files("core/lua_*"))
		for _, path in ipairs(files("core/bindings/*.c")) do
			assert.truthy(read(path):find("#include <lua.h>", 1, true) or path:match("main%.c$"), path .. " is not a binding")
		end
	end)
end)
