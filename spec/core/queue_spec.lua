-- The C work queue and framing (core/queue.c, core/frame.c), through the
-- test program the Makefile builds next to the objects.
local h = require "helpers"

describe("core queue and frames", function()
	it("pass their checks", function()
		h.c_checks("queue_test", 7)
	end)
end)
