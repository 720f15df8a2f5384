local T = require "projhost.testing"

-- A projection exercising every part of the harness.
local SOURCE = [[
return {
	name = "probe",
	from = { category = "acct", types = { "Add", "Fail", "Note", "Ask", "Ret", "Fn" } },
	init = function() return { n = 0, seen = {} } end,
	when = {
		Add = function(s, e, ctx)
			s.n = s.n + e.data.n
			s.seen[#s.seen + 1] = e.stream .. "@" .. e.version .. "#" .. e.position
			ctx:exec("UPDATE t SET n = $1 WHERE id = $2", s.n, e.stream)
		end,
		Fail = function(s, e, ctx)
			s.n = -1
			ctx:exec("UPDATE t SET n = 0")
			ctx:emit("out-1", "Lost", {})
			error("nope")
		end,
		Note = function(s, e, ctx)
			ctx.log("note", e.data.text)
			print("printed")
			ctx:emit("out-1", "Noted", { text = e.data.text }, { by = "probe" })
		end,
		Ask = function(s, e, ctx)
			local rows = ctx:query("SELECT n FROM t WHERE id = $1", e.stream)
			s.asked = rows
			ctx:exec("INSERT INTO j VALUES ($1, $2, $3)", e.stream, nil, { k = 1 })
		end,
		Ret = function(s, e) return { n = 99 } end,
		Fn = function(s, e) s.f = function() end end,
	},
	caught_up = function(ctx) ctx:exec("NOTIFY done") end,
}
]]

local PARTITIONED = [[
return {
	name = "part",
	from = { category = "acct" },
	partition = "stream",
	init = function() return { n = 0 } end,
	when = { Add = function(s, e) s.n = s.n + e.data.n end },
}
]]

describe("projhost.testing", function()
	local p
	before_each(function() p = T.load_source(SOURCE, "probe.lua") end)

	describe("load", function()
		it("loads a projection file", function()
			local h = T.load("spec/fixtures/projections/beta.lua")
			assert.equal("beta", h.def.name)
		end)

		it("raises the loader's message for a bad file", function()
			local ok, err = pcall(T.load, "spec/fixtures/projections/bad/unknown_field.lua")
			assert.is_false(ok)
			assert.equal("spec/fixtures/projections/bad/unknown_field.lua:3: unknown field 'whne'", err)
		end)
	end)

	describe("given", function()
		it("applies events and numbers them like the store", function()
			p:given(
				{ type = "Add", stream = "acct-1", data = { n = 2 } },
				{ type = "Add", stream = "acct-2", data = { n = 3 } },
				{ type = "Add", stream = "acct-1", data = { n = 4 } })
			assert.same({ n = 9, seen = { "acct-1@1#1", "acct-2@1#2", "acct-1@2#3" } }, p:state())
		end)

		it("accepts one array of events and chains", function()
			local r = p:given({ { type = "Add", stream = "acct-1", data = { n = 1 } },
				{ type = "Add", stream = "acct-1", data = { n = 1 } } })
			assert.equal(p, r)
			assert.equal(2, p:state().n)
		end)

		it("keeps explicit version and position", function()
			p:given({ type = "Add", stream = "acct-1", version = 5, position = 40, data = { n = 1 } })
			p:given({ type = "Add", stream = "acct-1", data = { n = 1 } })
			assert.same({ "acct-1@5#40", "acct-1@6#41" }, p:state().seen)
		end)

		it("renumbers events built with T.event", function()
			p:given(T.event { type = "Add", stream = "acct-1", data = { n = 1 } },
				T.event { type = "Add", stream = "acct-1", data = { n = 1 } })
			assert.same({ "acct-1@1#1", "acct-1@2#2" }, p:state().seen)
		end)

		it("ignores streams outside from, and types outside the filter", function()
			p:given(
				{ type = "Add", stream = "other-1", data = { n = 100 } },
				{ type = "Add", stream = "acctx-1", data = { n = 100 } },
				{ type = "Unknown", stream = "acct-1", data = { n = 100 } },
				{ type = "Add", stream = "acct", data = { n = 1 } })
			-- "acct" has no '-': its category is the whole name.  Ignored
			-- events still take a position, as in the store.
			assert.same({ n = 1, seen = { "acct@1#4" } }, p:state())
			assert.equal(1, #p:sql())
		end)

		it("respects from.stream", function()
			local h = T.load_source([[return { from = { stream = "acct-1" },
				when = { Add = function(s) s.n = (s.n or 0) + 1 end } }]])
			h:given({ type = "Add", stream = "acct-1" }, { type = "Add", stream = "acct-2" })
			assert.same({ n = 1 }, h:state())
		end)

		it("rejects events without type or stream", function()
			assert.has_error(function() p:given({ stream = "acct-1" }) end,
				"given: event #1 needs a non-empty 'type' and 'stream'")
		end)

		it("fills defaults", function()
			local h = T.load_source([[return { from = { all = true },
				when = { X = function(s, e) s.e = e end } }]])
			h:given({ type = "X", stream = "s-1" })
			assert.same({
				id = "00000000-0000-4000-8000-000000000001", stream = "s-1", version = 1,
				position = 1, type = "X", data = {}, metadata = {}, time = T.TIME,
			}, h:state().e)
		end)

		it("does not let handlers change the spec's tables", function()
			local data = { n = 1 }
			local h = T.load_source([[return { from = { all = true },
				when = { X = function(s, e) e.data.n = 50 end } }]])
			h:given({ type = "X", stream = "s-1", data = data })
			assert.same({ n = 1 }, data)
		end)

		it("replaces the state with a returned table", function()
			p:given({ type = "Ret", stream = "acct-1" })
			assert.same({ n = 99 }, p:state())
		end)
	end)

	describe("state", function()
		it("is the init state before any event", function()
			assert.same({ n = 0, seen = {} }, p:state())
		end)

		it("is a copy", function()
			p:state().n = 1000
			assert.equal(0, p:state().n)
		end)

		it("is kept per stream for partition = \"stream\"", function()
			local h = T.load_source(PARTITIONED, "part.lua")
			h:given({ type = "Add", stream = "acct-1", data = { n = 1 } },
				{ type = "Add", stream = "acct-2", data = { n = 10 } },
				{ type = "Add", stream = "acct-1", data = { n = 2 } })
			assert.same({ n = 3 }, h:state("acct-1"))
			assert.same({ n = 10 }, h:state("acct-2"))
			assert.is_nil(h:state("acct-3"))
		end)

		it("insists on the partition argument matching the projection", function()
			local h = T.load_source(PARTITIONED, "part.lua")
			assert.has_error(function() h:state() end)
			assert.has_error(function() p:state("acct-1") end)
		end)

		it("goes through JSON as in the database", function()
			local h = T.load_source([[return { from = { all = true },
				when = { X = function(s, e) s.by_id = s.by_id or {}; s.by_id[e.position * 1000] = true end } }]])
			h:given({ type = "X", stream = "s-1" })
			-- A sparse numeric key does not survive jsonb: it comes back a string.
			assert.same({ by_id = { ["1000"] = true } }, h:state())
		end)

		it("fails an event whose state cannot be stored", function()
			local ok, err = pcall(p.given, p, { type = "Fn", stream = "acct-1" })
			assert.is_false(ok)
			assert.matches("^probe: event acct%-1@1 %(Fn%): state cannot be stored as JSON", err)
			assert.is_nil(p:state().f)
		end)
	end)

	describe("sql", function()
		it("records statements and parameters in order", function()
			p:given({ type = "Add", stream = "acct-1", data = { n = 2 } })
			assert.same({ { sql = "UPDATE t SET n = $1 WHERE id = $2", params = { 2, "acct-1" }, n = 2 } },
				p:sql())
		end)

		it("records queries, nil parameters and JSON-encoded tables", function()
			p:given({ type = "Ask", stream = "acct-1" })
			local sql = p:sql()
			assert.equal(2, #sql)
			assert.same({ sql = "SELECT n FROM t WHERE id = $1", params = { "acct-1" }, n = 1 }, sql[1])
			assert.same({ sql = "INSERT INTO j VALUES ($1, $2, $3)",
				params = { "acct-1", nil, '{"k":1}' }, n = 3 }, sql[2])
		end)

		it("answers queries from on_query stubs, the latest first", function()
			p:on_query("FROM t", { { n = 1 } })
			p:on_query("FROM t WHERE", { { n = 5 } })
			p:given({ type = "Ask", stream = "acct-1" })
			assert.same({ { n = 5 } }, p:state().asked)
		end)

		it("answers unmatched queries with no rows", function()
			p:on_query("FROM elsewhere", { { n = 1 } })
			p:given({ type = "Ask", stream = "acct-1" })
			assert.same({}, p:state().asked)
		end)

		it("takes a function as a stub", function()
			p:on_query("FROM t", function(sql, id) return { { n = id } } end)
			p:given({ type = "Ask", stream = "acct-7" })
			assert.same({ { n = "acct-7" } }, p:state().asked)
		end)
	end)

	describe("a failing handler", function()
		it("raises naming projection, event and the handler's line", function()
			local ok, err = pcall(p.given, p, { type = "Fail", stream = "acct-1" })
			assert.is_false(ok)
			assert.equal("probe: event acct-1@1 (Fail): probe.lua:15: nope", err)
		end)

		it("leaves no trace: state, SQL and emits roll back", function()
			p:given({ type = "Add", stream = "acct-1", data = { n = 2 } })
			assert.has_error(function() p:given({ type = "Fail", stream = "acct-1" }) end)
			assert.same({ n = 2, seen = { "acct-1@1#1" } }, p:state())
			assert.equal(1, #p:sql())
			assert.same({}, p:emitted())
		end)

		it("stops at the failing event", function()
			assert.has_error(function()
				p:given({ type = "Add", stream = "acct-1", data = { n = 2 } },
					{ type = "Fail", stream = "acct-1" },
					{ type = "Add", stream = "acct-1", data = { n = 5 } })
			end)
			assert.equal(2, p:state().n)
		end)

		it("fails on a stubbed SQL error, at the handler's line", function()
			p:fail_sql("^UPDATE t", "deadlock detected", "40P01")
			local ok, err = pcall(p.given, p, { type = "Add", stream = "acct-1", data = { n = 1 } })
			assert.is_false(ok)
			assert.equal("probe: event acct-1@1 (Add): probe.lua:9: ctx:exec: deadlock detected [40P01]", err)
			assert.same({}, p:sql())
			assert.equal(0, p:state().n)
		end)
	end)

	describe("emitted and logs", function()
		it("records emitted events and log lines", function()
			p:given({ type = "Note", stream = "acct-1", data = { text = "hi" } })
			assert.same({ { stream = "out-1", type = "Noted", data = { text = "hi" },
				metadata = { by = "probe" } } }, p:emitted())
			assert.same({ "note hi", "probe.lua: printed" }, p:logs())
		end)
	end)

	describe("budget and error objects", function()
		local guard = require "projhost.guard"

		it("fails a handler that loops with the budget message instead of hanging", function()
			local h = T.load_source([[return { from = { all = true }, options = { budget = 0.05 },
				when = { A = function() while true do pcall(function() while true do end end) end end } }]], "loop.lua")
			local ok, err = pcall(h.given, h, { type = "A", stream = "s-1" })
			assert.is_false(ok)
			assert.equal("loop: event s-1@1 (A): overran its budget of 0.05s", err)
		end)

		it("fails an init that loops", function()
			local h = T.load_source([[local first = true
				return { from = { all = true }, options = { budget = 0.05 },
				init = function() if first then first = false return {} end while true do end end,
				when = { A = function() end } }]], "init.lua")
			local ok, err = pcall(h.state, h)
			assert.is_false(ok)
			assert.equal("init: init: overran its budget of 0.05s", err)
		end)

		it("turns an error object with a bad __tostring into a message", function()
			local h = T.load_source([[return { from = { all = true },
				when = { A = function() error(setmetatable({}, { __tostring = function() error("no", 0) end })) end },
				caught_up = function() error(setmetatable({}, { __tostring = function() while true do end end })) end }]],
				"obj.lua")
			local ok, err = pcall(h.given, h, { type = "A", stream = "s-1" })
			assert.is_false(ok)
			assert.equal("obj: event s-1@1 (A): (error object is a table value; its __tostring failed: no)", err)
			local saved = guard.TOSTRING_BUDGET
			guard.TOSTRING_BUDGET = 0.05
			ok, err = pcall(h.caught_up, h)
			guard.TOSTRING_BUDGET = saved
			assert.is_false(ok)
			assert.equal("obj: caught_up: (error object is a table value; its __tostring failed: "
				.. "overran its budget of 0.05s)", err)
		end)
	end)

	describe("caught_up", function()
		it("runs the hook with a recording ctx", function()
			p:caught_up()
			assert.same({ { sql = "NOTIFY done", params = {}, n = 0 } }, p:sql())
		end)
	end)

	describe("reset", function()
		it("forgets state, SQL, emitted events and numbering", function()
			p:given({ type = "Add", stream = "acct-1", data = { n = 2 } },
				{ type = "Note", stream = "acct-1", data = { text = "x" } })
			p:reset()
			assert.same({ n = 0, seen = {} }, p:state())
			assert.same({}, p:sql())
			assert.same({}, p:emitted())
			p:given({ type = "Add", stream = "acct-1", data = { n = 1 } })
			assert.same({ "acct-1@1#1" }, p:state().seen)
		end)
	end)

	describe("T.event", function()
		it("builds an event with defaults", function()
			assert.same({ id = "00000000-0000-4000-8000-000000000001", stream = "s-1", type = "X",
				version = 1, position = 1, data = {}, metadata = {}, time = T.TIME },
				T.event { type = "X", stream = "s-1" })
		end)

		it("keeps given fields", function()
			local e = T.event { type = "X", stream = "s-1", version = 3, data = { a = 1 } }
			assert.equal(3, e.version)
			assert.same({ a = 1 }, e.data)
		end)
	end)
end)
