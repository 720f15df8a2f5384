local P = require "projhost.projection"
local loader = require "projhost.loader"

local function def_of(source)
	return assert(loader.load_source(source, "p.lua"))
end

-- A backend that records calls and answers from `replies`.
local function recorder(replies)
	replies = replies or {}
	local b = { calls = {}, logs = {} }
	local function reply(name, ...)
		b.calls[#b.calls + 1] = { name, n = select("#", ...), ... }
		local r = replies[name]
		if r then return r(...) end
	end
	function b.exec(...) return reply("exec", ...) end
	function b.query(...) return reply("query", ...) end
	function b.emit(...) return reply("emit", ...) end
	function b.log(level, msg) b.logs[#b.logs + 1] = { level, msg } end
	return b
end

describe("projhost.projection", function()
	local def = def_of([[
		return {
			name = "p",
			from = { all = true },
			init = function() return { n = 0 } end,
			when = {
				A = function(s) s.n = s.n + 1 end,
				R = function(s) return { n = 100 } end,
				Bad = function(s) return 42 end,
				Boom = function(s) error("boom") end,
				["*"] = function(s) s.other = true end,
			},
		}
	]])

	describe("handler", function()
		it("finds the exact handler, else the catch-all", function()
			assert.equal(def.when.A, P.handler(def, "A"))
			assert.equal(def.when["*"], P.handler(def, "Z"))
		end)

		it("returns nil without a catch-all", function()
			local d = def_of("return { from = { all = true }, when = { A = function() end } }")
			assert.is_nil(P.handler(d, "Z"))
		end)
	end)

	describe("init_state", function()
		it("calls init", function()
			assert.same({ n = 0 }, P.init_state(def))
		end)

		it("gives a fresh table each time", function()
			assert.not_equal(P.init_state(def), P.init_state(def))
		end)
	end)

	describe("apply", function()
		it("lets the handler mutate the state in place", function()
			local s = { n = 1 }
			local r = P.apply(def, s, { type = "A" })
			assert.equal(s, r)
			assert.same({ n = 2 }, r)
		end)

		it("replaces the state with a returned table", function()
			assert.same({ n = 100 }, P.apply(def, { n = 1 }, { type = "R" }))
		end)

		it("leaves the state alone without a handler", function()
			local d = def_of("return { from = { all = true }, when = { A = function(s) s.x = 1 end } }")
			local s = { n = 1 }
			assert.equal(s, P.apply(d, s, { type = "Z" }))
			assert.same({ n = 1 }, s)
		end)

		it("uses the catch-all", function()
			assert.same({ n = 0, other = true }, P.apply(def, { n = 0 }, { type = "Z" }))
		end)

		it("raises when a handler returns something other than a table", function()
			local ok, err = pcall(P.apply, def, {}, { type = "Bad" })
			assert.is_false(ok)
			assert.equal("p.lua:8: handler for 'Bad' returned a number, expected a table or nothing", err)
		end)

		it("lets handler errors propagate with the handler's line", function()
			local ok, err = pcall(P.apply, def, {}, { type = "Boom" })
			assert.is_false(ok)
			assert.equal("p.lua:9: boom", err)
		end)

		it("sets ctx.event to the handler's view of the event", function()
			local ctx = P.new_ctx(def, recorder())
			local e = { type = "A", position = 7, stream = "s-1", version = 2 }
			P.apply(def, { n = 0 }, e, ctx)
			assert.are_not.equal(e, ctx.event)
			assert.same({ "A", 7, "s-1", 2 }, { ctx.event.type, ctx.event.position, ctx.event.stream, ctx.event.version })
		end)

		it("gives the handler a view: what it assigns stays out of the caller's event", function()
			local d = { when = { A = function(_, ev)
				ev.position, ev.stream, ev.version, ev.index = 1e9, "x", -1, 99
				rawset(ev, "tx", "1")
			end } }
			local e = { type = "A", position = 7, stream = "s-1", version = 2, index = 3, tx = "5" }
			P.apply(d, {}, e, nil)
			assert.same({ type = "A", position = 7, stream = "s-1", version = 2, index = 3, tx = "5" }, e)
		end)
	end)

	describe("state encoding", function()
		it("round-trips a state", function()
			local text = assert(P.encode_state({ total = 2, by = { A = 2 } }))
			assert.same({ total = 2, by = { A = 2 } }, P.decode_state(text))
		end)

		it("reports a state that cannot be stored", function()
			local text, err = P.encode_state({ f = function() end })
			assert.is_nil(text)
			assert.matches("^state cannot be stored as JSON: ", err)
		end)
	end)

	describe("ctx", function()
		it("names the projection", function()
			assert.equal("p", P.new_ctx(def, recorder()).projection)
		end)

		it("passes exec through and returns the count", function()
			local b = recorder({ exec = function() return 3 end })
			local ctx = P.new_ctx(def, b)
			assert.equal(3, ctx:exec("UPDATE t SET x = $1", 5))
			assert.same({ { "exec", "UPDATE t SET x = $1", 5, n = 2 } }, b.calls)
		end)

		it("keeps nils in the middle of the parameters", function()
			local b = recorder({ exec = function() return 1 end })
			local ctx = P.new_ctx(def, b)
			ctx:exec("INSERT INTO t VALUES ($1, $2, $3, $4)", "a", nil, false, nil)
			local call = b.calls[1]
			assert.equal(5, call.n)
			assert.equal("a", call[3])
			assert.is_nil(call[4])
			assert.is_false(call[5])
			assert.is_nil(call[6])
		end)

		it("sends JSON null as SQL NULL (nil) to exec and query, also from event data", function()
			local b = recorder({ exec = function() return 1 end, query = function() return {} end })
			local ctx = P.new_ctx(def, b)
			local data = P.json.decode('{"x": null, "y": 1}')
			ctx:exec("INSERT INTO t VALUES ($1, $2, $3)", data.x, require("cjson").null, data.y)
			ctx:query("SELECT $1::text, $2", P.json.null, "z")
			assert.equal(4, b.calls[1].n)
			assert.is_nil(b.calls[1][3])
			assert.is_nil(b.calls[1][4])
			assert.equal(1, b.calls[1][5])
			assert.equal(3, b.calls[2].n)
			assert.is_nil(b.calls[2][3])
			assert.equal("z", b.calls[2][4])
		end)

		it("keeps JSON null inside table parameters as JSON null", function()
			local b = recorder({ exec = function() return 1 end })
			local ctx = P.new_ctx(def, b)
			ctx:exec("SELECT $1::jsonb", P.json.decode('{"x": null}'))
			assert.equal('{"x":null}', b.calls[1][3])
		end)

		it("JSON-encodes table parameters", function()
			local b = recorder({ query = function() return {} end })
			local ctx = P.new_ctx(def, b)
			ctx:query("SELECT $1::jsonb", { a = 1 })
			assert.same({ a = 1 }, require("cjson").decode(b.calls[1][3]))
			assert.is_string(b.calls[1][3])
		end)

		it("returns query rows", function()
			local rows = { { id = "x", amount = 1 } }
			local ctx = P.new_ctx(def, recorder({ query = function() return rows end }))
			assert.equal(rows, ctx:query("SELECT 1"))
		end)

		it("raises a backend failure at the caller's line, with the code", function()
			local ctx = P.new_ctx(def, recorder({
				exec = function() return nil, "relation \"t\" does not exist", "42P01" end,
			}))
			local ok, err = pcall(function()
				ctx:exec("INSERT INTO t VALUES (1)") -- this line is in the message
			end)
			assert.is_false(ok)
			assert.matches("projection_spec%.lua:%d+: ctx:exec: relation \"t\" does not exist %[42P01%]$", err)
			local line = tonumber(err:match("projection_spec%.lua:(%d+):"))
			local src = {}
			for l in io.lines("spec/unit/projection_spec.lua") do src[#src + 1] = l end
			assert.matches("this line is in the message", src[line])
		end)

		it("raises query and emit failures too", function()
			local ctx = P.new_ctx(def, recorder({
				query = function() return nil, "timeout" end,
				emit = function() return nil, "wrong expected version", "P0001" end,
			}))
			assert.has_error(function() ctx:query("SELECT 1") end)
			local _, qerr = pcall(ctx.query, ctx, "SELECT 1")
			assert.matches("ctx:query: timeout$", qerr)
			local _, eerr = pcall(ctx.emit, ctx, "s-1", "T", {})
			assert.matches("ctx:emit: wrong expected version %[P0001%]$", eerr)
		end)

		it("passes emit through and returns the version", function()
			local b = recorder({ emit = function() return 7 end })
			local ctx = P.new_ctx(def, b)
			assert.equal(7, ctx:emit("alerts-1", "Alert", { x = 1 }, { m = true }))
			assert.same({ "emit", "alerts-1", "Alert", { x = 1 }, { m = true }, n = 4 }, b.calls[1])
		end)

		it("rejects misuse", function()
			local ctx = P.new_ctx(def, recorder({ exec = function() return 1 end,
				emit = function() return 1 end }))
			local cases = {
				{ function() ctx:exec(42) end, "ctx:exec: sql must be a non%-empty string" },
				{ function() ctx:query(nil) end, "ctx:query: sql must be a non%-empty string" },
				{ function() ctx.exec("SELECT 1") end, "call it with a colon" },
				{ function() ctx:exec("SELECT $1", print) end, "parameter 1 is a function" },
				{ function() ctx:emit("", "T") end, "ctx:emit: stream must be a non%-empty string" },
				{ function() ctx:emit("s-1", nil) end, "ctx:emit: type must be a non%-empty string" },
				{ function() ctx:emit("s-1", "T", "data") end, "ctx:emit: data must be a table or nil" },
				{ function() ctx:emit("s-1", "T", {}, 5) end, "ctx:emit: metadata must be a table or nil" },
				{ function() ctx:emit("s-1", "T", { f = print }) end, "data cannot be encoded as JSON" },
			}
			for i, c in ipairs(cases) do
				local ok, err = pcall(c[1])
				assert.is_false(ok, "case " .. i)
				assert.matches(c[2], err)
				-- level 2: the message points at this spec, not at projection.lua
				assert.matches("projection_spec%.lua:%d+:", err)
			end
		end)

		it("logs with a dot or a colon", function()
			local b = recorder()
			local ctx = P.new_ctx(def, b)
			ctx.log("a", 1, nil, true)
			ctx:log("b", { 1 } == nil)
			assert.same({ { "info", "a 1 nil true" }, { "info", "b false" } }, b.logs)
		end)
	end)
end)

describe("ctx:upsert", function()
	local P = require "projhost.projection"
	local log, ctx
	before_each(function()
		log = {}
		ctx = P.new_ctx({ name = "t" }, {
			exec = function(sql, ...) log[#log + 1] = { sql = sql, params = { ... } } return 1 end,
			query = function(sql) log[#log + 1] = { sql = sql } return {} end,
			emit = function() return 1 end,
			log = function() end,
		})
	end)

	it("coalesces writes to one key and flushes one set-based statement per table", function()
		ctx:upsert("balances", "id", { id = "a", amount = 1 })
		ctx:upsert("balances", "id", { id = "b", amount = 2 })
		ctx:upsert("balances", "id", { id = "a", amount = 3 })
		assert.same({}, log)
		assert.is_true(ctx._flush())
		assert.equal(1, #log)
		assert.equal('INSERT INTO "balances" ("amount", "id") SELECT "amount", "id" FROM '
			.. 'json_populate_recordset(NULL::"balances", $1::json) ON CONFLICT ("id") '
			.. 'DO UPDATE SET "amount" = EXCLUDED."amount"', log[1].sql)
		assert.same({ { id = "a", amount = 3 }, { id = "b", amount = 2 } }, P.json.decode(log[1].params[1]))
		assert.is_true(ctx._flush()) -- nothing left
		assert.equal(1, #log)
	end)

	it("writes pending rows before a later ctx:exec or ctx:query, keeping statement order", function()
		ctx:upsert("s.t", { "a", "b" }, { a = 1, b = 2 })
		ctx:exec("DELETE FROM x")
		assert.equal(2, #log)
		assert.matches('^INSERT INTO "s"%."t" %("a", "b"%).- ON CONFLICT %("a", "b"%) DO NOTHING$', log[1].sql)
		assert.equal("DELETE FROM x", log[2].sql)
	end)

	it("rejects bad identifiers, missing keys and changing columns", function()
		assert.has_error(function() ctx:upsert("bad name", "id", { id = 1 }) end)
		assert.has_error(function() ctx:upsert("t", "id", { other = 1 }) end)
		ctx:upsert("t", "id", { id = 1, v = 1 })
		assert.has_error(function() ctx:upsert("t", "id", { id = 2, w = 1 }) end)
		assert.has_error(function() ctx:upsert("t", "id", { id = 2 }) end)
	end)

	it("writes JSON null in a row as JSON null (SQL NULL in the column)", function()
		local data = P.json.decode('{"id": "a", "amount": null}')
		ctx:upsert("balances", "id", { id = data.id, amount = data.amount })
		assert.is_true(ctx._flush())
		assert.matches('"amount":null', log[1].params[1])
	end)

	it("forgets pending rows on discard", function()
		ctx:upsert("t", "id", { id = 1 })
		ctx._discard()
		assert.is_true(ctx._flush())
		assert.same({}, log)
	end)
end)

describe("which events a projection sees (one rule for the worker and projhost.testing)", function()
	local P = require "projhost.projection"
	local T = require "projhost.testing"

	it("follows its source and its types", function()
		local cat = { from = { category = "account" } }
		assert.is_true(P.sees(cat, "account-1", "X"))
		assert.is_true(P.sees(cat, "account", "X"))
		assert.is_true(P.sees(cat, "account-1-2", "X"))
		assert.is_false(P.sees(cat, "accounts-1", "X"))
		assert.is_false(P.sees(cat, "acc-1", "X"))
		local one = { from = { stream = "account-1" } }
		assert.is_true(P.sees(one, "account-1", "X"))
		assert.is_false(P.sees(one, "account-10", "X"))
		local typed = { from = { all = true }, type_filter = { "A", "B" } }
		assert.is_true(P.sees(typed, "x", "B"))
		assert.is_false(P.sees(typed, "x", "C"))
		assert.is_false(P.sees(typed, "x", "a"))
	end)

	it("is what projhost.testing applies", function()
		local h = T.load_source([[return {
			name = "seen", from = { category = "account", types = { "A" } },
			init = function() return { n = 0 } end,
			when = { A = function(s) s.n = s.n + 1 end },
		}]])
		h:given(T.event{ stream = "account-1", type = "A" }, T.event{ stream = "accounts-1", type = "A" },
			T.event{ stream = "account-2", type = "B" }, T.event{ stream = "account", type = "A" })
		assert.equal(2, h:state().n)
	end)
end)
