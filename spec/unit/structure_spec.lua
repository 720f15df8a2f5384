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
end)
