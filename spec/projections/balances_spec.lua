-- Spec for projections/balances.lua, written the way projection authors
-- should test theirs: given events, then check state, SQL and emits.
local T = require "projhost.testing"

describe("balances projection", function()
	local p
	before_each(function()
		p = T.load("projections/balances.lua")
	end)

	it("keeps a balance per account", function()
		p:given(
			{ type = "Deposited", stream = "account-1", data = { amount = 100 } },
			{ type = "Deposited", stream = "account-2", data = { amount = 5 } },
			{ type = "Withdrawn", stream = "account-1", data = { amount = 30 } })

		assert.same({ amount = 70 }, p:state("account-1"))
		assert.same({ amount = 5 }, p:state("account-2"))
	end)

	it("upserts the row with the new amount after each event", function()
		p:given(
			{ type = "Deposited", stream = "account-1", data = { amount = 100 } },
			{ type = "Withdrawn", stream = "account-1", data = { amount = 30 } })

		local sql = p:sql()
		assert.equal(2, #sql)
		for _, stmt in ipairs(sql) do
			assert.matches("^INSERT INTO balances %(id, amount%) VALUES %(%$1, %$2%)", stmt.sql)
			assert.matches("ON CONFLICT %(id%) DO UPDATE SET amount = %$2", stmt.sql)
		end
		assert.same({ "account-1", 100 }, sql[1].params)
		assert.same({ "account-1", 70 }, sql[2].params)
	end)

	it("ignores other categories and event types", function()
		p:given(
			{ type = "Deposited", stream = "wallet-1", data = { amount = 100 } },
			{ type = "Renamed", stream = "account-1", data = { name = "x" } })

		assert.is_nil(p:state("wallet-1"))
		assert.is_nil(p:state("account-1"))
		assert.same({}, p:sql())
	end)

	it("emits nothing", function()
		p:given({ type = "Deposited", stream = "account-1", data = { amount = 1 } })
		assert.same({}, p:emitted())
	end)

	it("fails on an event without an amount, leaving no trace", function()
		p:given({ type = "Deposited", stream = "account-1", data = { amount = 10 } })

		local ok, err = pcall(p.given, p, { type = "Withdrawn", stream = "account-1", data = {} })
		assert.is_false(ok)
		assert.matches("^balances: event account%-1@2 %(Withdrawn%): projections/balances%.lua:%d+: "
			.. "attempt to perform arithmetic", err)
		assert.same({ amount = 10 }, p:state("account-1"))
		assert.equal(1, #p:sql())
	end)

	it("fails when the database rejects the upsert", function()
		p:fail_sql("INSERT INTO balances", "value too long", "22001")

		assert.has_error(function()
			p:given({ type = "Deposited", stream = "account-1", data = { amount = 10 } })
		end)
		assert.is_nil(p:state("account-1"))
	end)

	it("declares its table and how to empty it", function()
		assert.equal(1, #p.def.setup)
		assert.matches("CREATE TABLE IF NOT EXISTS balances", p.def.setup[1])
		assert.same({ "TRUNCATE balances" }, p.def.reset)
	end)
end)
