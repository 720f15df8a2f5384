-- The master's scheduling rules (core/schedule.c) and its projection
-- registry (core/registry.c), through the test programs the Makefile
-- builds next to the objects.
local h = require "helpers"

describe("core schedule and registry", function()
	it("pass their checks", function()
		h.c_checks("schedule_test", 5)
		h.c_checks("registry_test", 2)
	end)
end)
