-- The master's scheduling rules (core/schedule.c) and its projection
-- registry (core/registry.c), through the test programs the Makefile
-- builds next to the objects.
local h = require "helpers"

local function checks(program, expected)
	local dir = h.bin:find("build%-asan") and "build-asan" or "build"
	local p = io.popen(h.root .. "/" .. dir .. "/" .. program .. " 2>&1; echo \"exit=$?\"")
	local out = p:read("*a")
	p:close()
	assert.matches("exit=0", out, 1, true)
	local oks = 0
	for line in out:gmatch("[^\n]+") do
		if line:match("^ok ") then oks = oks + 1 end
	end
	assert.equal(expected, oks, out)
end

describe("core schedule and registry", function()
	it("pass their checks", function()
		checks("schedule_test", 5)
		checks("registry_test", 2)
	end)
end)
