-- The record of a pipeline (core/pipeline.c): which statement each result
-- and error belongs to, and its caller's tag, through the test program the
-- Makefile builds next to the objects (no server: it answers for libpq).
local h = require "helpers"

describe("core pipeline", function()
	it("passes its checks", function()
		h.c_checks("pipeline_test", 5)
	end)
end)
