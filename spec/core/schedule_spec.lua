-- The master's scheduling rules (core/schedule.c), through the test program
-- the Makefile builds next to the objects.
local h = require "helpers"

describe("core schedule", function()
	it("passes its checks", function()
		local dir = h.bin:find("build%-asan") and "build-asan" or "build"
		local p = io.popen(h.root .. "/" .. dir .. "/schedule_test 2>&1; echo \"exit=$?\"")
		local out = p:read("*a")
		p:close()
		assert.matches("exit=0", out, 1, true)
		local oks = 0
		for line in out:gmatch("[^\n]+") do
			if line:match("^ok ") then oks = oks + 1 end
		end
		assert.equal(5, oks, out)
	end)
end)
