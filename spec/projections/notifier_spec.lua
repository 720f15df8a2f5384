-- Spec for projections/notifier.lua: a projection that emits events.
local T = require "projhost.testing"

describe("notifier projection", function()
	local p
	before_each(function()
		p = T.load("projections/notifier.lua")
	end)

	it("emits an alert for a large withdrawal", function()
		p:given(
			{ type = "Deposited", stream = "account-42", data = { amount = 500 } },
			{ type = "Withdrawn", stream = "account-42", data = { amount = 250 } })

		assert.same({
			{
				stream = "alerts-42",
				type = "LargeWithdrawal",
				-- position 2: the second event in the store
				data = { account = "account-42", amount = 250, position = 2 },
			},
		}, p:emitted())
		assert.same({ alerts = 1 }, p:state())
	end)

	it("treats 100 as large and 99 as not", function()
		p:given(
			{ type = "Withdrawn", stream = "account-1", data = { amount = 99 } },
			{ type = "Withdrawn", stream = "account-1", data = { amount = 100 } })

		local emitted = p:emitted()
		assert.equal(1, #emitted)
		assert.equal(100, emitted[1].data.amount)
		assert.same({ alerts = 1 }, p:state())
	end)

	it("ignores deposits and other categories", function()
		p:given(
			{ type = "Deposited", stream = "account-1", data = { amount = 1000 } },
			{ type = "Withdrawn", stream = "wallet-1", data = { amount = 1000 } })

		assert.same({}, p:emitted())
		assert.same({ alerts = 0 }, p:state())
	end)

	it("only sees withdrawals", function()
		assert.same({ "Withdrawn" }, p.def.type_filter)
	end)

	it("issues no SQL", function()
		p:given({ type = "Withdrawn", stream = "account-1", data = { amount = 500 } })
		assert.same({}, p:sql())
	end)
end)
