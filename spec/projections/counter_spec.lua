-- Spec for projections/counter.lua: a projection whose state is the result.
local T = require "projhost.testing"

describe("counter projection", function()
	local p
	before_each(function()
		p = T.load("projections/counter.lua")
	end)

	it("starts at zero", function()
		assert.same({ total = 0, by_type = {} }, p:state())
	end)

	it("counts every event, in total and per type, from any stream", function()
		p:given(
			{ type = "Deposited", stream = "account-1" },
			{ type = "Deposited", stream = "account-2" },
			{ type = "Withdrawn", stream = "account-1" },
			{ type = "UserRegistered", stream = "user-7" })

		assert.same({
			total = 4,
			by_type = { Deposited = 2, Withdrawn = 1, UserRegistered = 1 },
		}, p:state())
	end)

	it("sees all types (no type filter)", function()
		assert.is_nil(p.def.type_filter)
	end)

	it("issues no SQL and emits nothing", function()
		p:given({ type = "Deposited", stream = "account-1" })
		assert.same({}, p:sql())
		assert.same({}, p:emitted())
	end)
end)
