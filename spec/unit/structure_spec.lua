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
		for _, path in ipairs(files("core/*.c core/*.h")) do
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
		for _, path in ipairs(files("core/*.c core/*.h lua/projhost/*.lua lua/projhost/*/*.lua")) do
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
end)
