-- Pipelined ctx:exec and set-based ctx:upsert on a real PostgreSQL: the
-- effects are the same as one statement per event, and a failure is still
-- charged to the event that caused it.
local h = require "helpers"
local scalar = h.scalar

describe("set-based writes", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("upsert")
		conn = h.connect(dsn)
		assert(require("projhost.schema").migrate(conn))
		dir = h.tmpdir()
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	local function load(n, streams)
		h.insert_events(conn, "up", n, streams, "Deposited")
	end

	it("ctx:upsert coalesces a batch into one statement per table with the same result", function()
		h.write_file(dir .. "/bal.lua", [[
return {
	from = { category = "up" },
	setup = "CREATE TABLE IF NOT EXISTS bal (id text PRIMARY KEY, amount bigint NOT NULL, n int NOT NULL)",
	init = function() return { a = {}, n = {} } end,
	when = {
		Deposited = function(s, e, ctx)
			s.a[e.stream] = (s.a[e.stream] or 0) + e.data.amount
			s.n[e.stream] = (s.n[e.stream] or 0) + 1
			ctx:upsert("bal", "id", { id = e.stream, amount = s.a[e.stream], n = s.n[e.stream] })
		end,
	},
}
]])
		load(5000, 37)
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 300 } })
		assert.equal(0, code, out .. err)
		local truth = assert(conn:query([[SELECT stream_id AS id, sum((data->>'amount')::bigint)::text AS amount,
			count(*)::text AS n FROM projhost.events GROUP BY 1 ORDER BY 1]]))
		local model = assert(conn:query("SELECT id, amount::text AS amount, n::text AS n FROM bal ORDER BY 1"))
		assert.equal(37, #model)
		assert.same(truth, model)
	end)

	it("charges a failing pipelined ctx:exec to the event that issued it", function()
		h.write_file(dir .. "/strict.lua", [[
return {
	from = { category = "up" },
	setup = "CREATE TABLE IF NOT EXISTS strict (position bigint PRIMARY KEY, amount bigint CHECK (amount <> 3))",
	when = {
		Deposited = function(s, e, ctx)
			ctx:exec("INSERT INTO strict VALUES ($1, $2)", e.position, e.data.amount)
		end,
	},
	on_error = function() return "park" end,
}
]])
		load(40, 1) -- amounts 0..6 repeating: every position with amount 3 violates the check
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 100 } })
		assert.equal(0, code, out .. err)
		assert.equal(scalar(conn, "SELECT count(*) FROM projhost.events WHERE (data->>'amount')::int <> 3"),
			scalar(conn, "SELECT count(*) FROM strict"))
		local parked = assert(conn:query("SELECT global_position FROM projhost.parked ORDER BY 1"))
		local want = assert(conn:query([[SELECT global_position FROM projhost.events
			WHERE (data->>'amount')::int = 3 ORDER BY global_position]]))
		assert.same(want, parked)
		assert.matches("violates check constraint", scalar(conn, "SELECT error FROM projhost.parked LIMIT 1"))
	end)

	it("finds the event whose upsert row breaks the set-based write", function()
		h.write_file(dir .. "/pick.lua", [[
return {
	from = { category = "up" },
	setup = "CREATE TABLE IF NOT EXISTS pick (id text PRIMARY KEY, amount bigint CHECK (amount < 100))",
	when = {
		Deposited = function(s, e, ctx)
			local amount = e.version == 7 and 1000 or e.data.amount
			ctx:upsert("pick", "id", { id = e.stream .. "/" .. e.version, amount = amount })
		end,
	},
	on_error = function() return "park" end,
}
]])
		load(20, 1)
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 50 } })
		assert.equal(0, code, out .. err)
		assert.equal("19", scalar(conn, "SELECT count(*) FROM pick"))
		assert.equal("7", scalar(conn, "SELECT stream_version FROM projhost.parked"))
		assert.matches("ctx:upsert: .*check constraint", scalar(conn, "SELECT error FROM projhost.parked"))
	end)
end)
