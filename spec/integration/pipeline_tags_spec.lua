-- Pipeline tags (issue 12 item 3): each statement queued in pipeline mode
-- carries a tag its caller gives (conn:send_as and friends, conn:query_as),
-- an error comes back with the tag of the statement that failed, and
-- conn:pending() lists the tags still waiting - so the worker keeps no
-- mirror of statement numbers, and an error is charged to the event that
-- caused it however many syncs (ctx:query, ctx:emit) the batch had.
local h = require "helpers"

-- positions (as numbers, sorted) of a query's first column
local function positions(conn, sql)
	local out = {}
	for _, r in ipairs(assert(conn:query(sql))) do
		local _, v = next(r)
		out[#out + 1] = tonumber(v)
	end
	table.sort(out)
	return out
end

describe("pipeline tags (conn)", function()
	local dsn, conn

	before_each(function()
		dsn = h.fresh_db("tags")
		conn = h.connect(dsn)
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
		conn = nil
	end)

	it("give back the failed statement's tag, whatever value it is", function()
		local t = { lo = 1, hi = 2 }
		-- (false and whole numbers that fit an int are coded in C, the rest kept in a table)
		for _, tag in ipairs({ false, true, 7, 0, 2147483645, 2147483646, 2 ^ 53, -1, -1.5, 1e300, -math.huge,
			"own", "", t, print, coroutine.create(print) }) do
			assert(conn:pipeline(true))
			assert.equal(1, conn:send_as("before", "SELECT 1"))
			assert.equal(2, conn:send_as(tag, "SELECT 1/0"))
			assert.equal(3, conn:send_as("after", "SELECT 1"))
			local ok, msg, code, got = conn:sync()
			assert.is_nil(ok)
			assert.matches("division by zero", msg)
			assert.equal("22012", code)
			assert.is_true(rawequal(tag, got), tostring(tag))
			assert(conn:pipeline(false))
		end
		-- NaN too (not equal to itself)
		assert(conn:pipeline(true))
		conn:send_as(0 / 0, "SELECT 1/0")
		local _, _, _, nan = conn:sync()
		assert.is_true(type(nan) == "number" and nan ~= nan)
		assert(conn:pipeline(false))
	end)

	it("route an error in the 2nd of 3 statements queued after an intermediate sync to that statement", function()
		assert(conn:pipeline(true))
		conn:send_as("a1", "SELECT 1")
		conn:send_as("a2", "SELECT 2")
		conn:send_as("a3", "SELECT 3")
		-- syncs: the numbering starts again after it
		local rows, err = conn:query_as("q", "SELECT 4 AS x")
		assert.same({ { x = "4" } }, rows, err)
		assert.equal(1, conn:send_as("b1", "SELECT 1"))
		assert.equal(2, conn:send_as("b2", "SELECT 1/0"))
		assert.equal(3, conn:send_as("b3", "SELECT 1"))
		local ok, _, code, tag, res = conn:sync(true)
		assert.is_nil(ok)
		assert.same({ "22012", "b2" }, { code, tag })
		assert.same({ 1, false, false }, res)
		assert(conn:pipeline(false))
	end)

	it("route a prepared text's error (a Parse goes before it) to the statement it was for", function()
		local DIV = "SELECT 10 / $1::int AS d"
		local BAD = "SELECT $1::nosuchtype"
		for round = 1, 3 do -- unnamed, then Parse + execute, then by name
			assert(conn:pipeline(true))
			conn:send_as("r" .. round .. "a", DIV, 1)
			conn:send_as("r" .. round .. "b", DIV, 0)
			conn:send_as("r" .. round .. "c", DIV, 2)
			local ok, _, code, tag, res = conn:sync(true)
			assert.is_nil(ok)
			assert.same({ "22012", "r" .. round .. "b" }, { code, tag })
			assert.same({ 1, false, false }, res)
			assert(conn:pipeline(false))
		end
		-- a Parse that fails: charged to its statement, not the one before
		for round = 1, 3 do
			assert(conn:pipeline(true))
			conn:send_as("ok" .. round, "SELECT 1")
			conn:send_as("bad" .. round, BAD, 1)
			conn:send_as("after" .. round, "SELECT 1")
			local ok, _, code, tag = conn:sync()
			assert.is_nil(ok)
			assert.same({ "42704", "bad" .. round }, { code, tag })
			assert(conn:pipeline(false))
		end
	end)

	it("conn:query_as: its own failure comes back with its tag, an earlier statement's with that one's", function()
		assert(conn:pipeline(true))
		conn:send_as("first", "SELECT 1")
		local rows, _, code, tag = conn:query_as("mine", "SELECT 1/0")
		assert.is_nil(rows)
		assert.same({ "22012", "mine" }, { code, tag })
		conn:send_as("early", "SELECT 1/0")
		conn:send_as("late", "SELECT 1")
		rows, _, code, tag = conn:query_as("mine", "SELECT 1 AS x")
		assert.is_nil(rows)
		assert.same({ "22012", "early" }, { code, tag })
		-- and outside pipeline mode, its own tag too
		assert(conn:pipeline(false))
		rows, _, code, tag = conn:query_as({}, "SELECT 1/0")
		assert.is_nil(rows)
		assert.equal("22012", code)
		assert.equal("table", type(tag))
		assert.same({ { x = "1" } }, (conn:query_as("unused", "SELECT 1 AS x")))
	end)

	it("conn:take gives the failed statement's tag, and the sync again", function()
		assert(conn:pipeline(true))
		conn:send_as("boom", "SELECT 1/0")
		conn:send_as("next", "SELECT 1")
		assert(conn:flush())
		local r, _, code, tag = conn:take()
		assert.is_nil(r)
		assert.same({ "22012", "boom" }, { code, tag })
		local ok, _, code2, tag2 = conn:sync()
		assert.is_nil(ok)
		assert.same({ "22012", "boom" }, { code2, tag2 })
		assert(conn:pipeline(false))
	end)

	it("conn:pending lists the tags of the statements whose results were not read, in order", function()
		assert(conn:pipeline(true))
		assert.same({}, conn:pending())
		local t = {}
		conn:send_as(false, "SELECT 1")
		conn:send("SELECT 2") -- no tag: its number
		conn:send_as(t, "SELECT 3")
		conn:send_as(5, "SELECT $1::int", 1)
		conn:send_as(6, "SELECT $1::int", 2) -- a Parse goes before it: not a statement
		local p = conn:pending()
		assert.equal(5, #p)
		assert.same({ false, 2 }, { p[1], p[2] })
		assert.is_true(rawequal(t, p[3]))
		assert.same({ 5, 6 }, { p[4], p[5] })
		assert(conn:flush())
		assert.equal(1, conn:take())
		p = conn:pending()
		assert.equal(4, #p)
		assert.equal(2, p[1])
		assert(conn:sync())
		assert.same({}, conn:pending())
		-- the query's sync reads everything
		conn:send_as("x", "SELECT 1")
		assert(conn:query_as("q", "SELECT 1"))
		assert.same({}, conn:pending())
		assert(conn:pipeline(false))
		assert.same({}, conn:pending())
	end)

	it("a statement sent without a tag comes back as its number, as before", function()
		assert(conn:pipeline(true))
		conn:send_as("tagged", "SELECT 1")
		conn:send("SELECT 1")
		conn:send("SELECT 1/0")
		local ok, _, code, tag = conn:sync()
		assert.is_nil(ok)
		assert.same({ "22012", 3 }, { code, tag })
		assert(conn:pipeline(false))
	end)

	it("are dropped at the sync (a tag is not kept alive) and when the connection closes", function()
		local weak = setmetatable({}, { __mode = "v" })
		assert(conn:pipeline(true))
		do
			local a, b = {}, {}
			weak.a, weak.b = a, b
			conn:send_as(a, "SELECT 1")
			conn:query_as(b, "SELECT 1")
		end
		collectgarbage()
		collectgarbage()
		assert.is_nil(weak.a)
		assert.is_nil(weak.b)
		do
			local c = {}
			weak.c = c
			conn:send_as(c, "SELECT 1")
		end
		collectgarbage()
		assert.is_not_nil(weak.c) -- queued: kept
		assert(conn:sync())
		collectgarbage()
		collectgarbage()
		assert.is_nil(weak.c)
		do
			local d = {}
			weak.d = d
			conn:send_as(d, "SELECT 1")
		end
		conn:close()
		collectgarbage()
		collectgarbage()
		assert.is_nil(weak.d)
		conn = nil
	end)

	it("refuse nil as a tag and need pipeline mode to send", function()
		assert(conn:pipeline(true))
		assert.has_error(function() conn:send_as(nil, "SELECT 1") end)
		assert.has_error(function() conn:send_page_as(nil, "SELECT 1") end)
		assert.same({}, conn:pending())
		assert(conn:pipeline(false))
		assert.has_error(function() conn:send_as(1, "SELECT 1") end,
			"conn:send needs pipeline mode (conn:pipeline(true))")
	end)

	it("send_query_as, send_events_as and send_page_as queue their kind with a tag", function()
		assert(conn:pipeline(true))
		assert.equal(1, conn:send_query_as("q", "SELECT 1 AS a"))
		assert.equal(2, conn:send_events_as("e", "SELECT 2 AS a"))
		assert.equal(3, conn:send_page_as("p", "SELECT 3 AS a"))
		assert.equal(4, conn:send_page_as("bad", "SELECT 1/0"))
		local ok, _, code, tag, res = conn:sync(true)
		assert.is_nil(ok)
		assert.same({ "22012", "bad" }, { code, tag })
		assert.same({ { a = "1" } }, res[1])
		assert.equal("2", res[2][1].a)
		assert.equal("userdata", type(res[3]))
		assert.equal(1, res[3]:count())
		assert.is_false(res[4])
		assert(conn:pipeline(false))
	end)
end)

-- The worker: a batch whose handlers sync in the middle (ctx:query,
-- ctx:emit), then queue statements of which the 2nd of 3 fails. It must be
-- charged to its own event. settle() would still find the culprit if it
-- were charged to another event (it runs events again to be sure), so the
-- spec counts how often each handler ran: once in the failed batch and once
-- more (the events before the culprit in one transaction, the culprit alone,
-- the rest in the next batch). An error charged to another event makes
-- settle commit and re-run a different set, and some event runs a third
-- time.
describe("pipeline tags (worker)", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("tagsw")
		conn = h.connect(dsn)
		assert(require("projhost.schema").migrate(conn))
		dir = h.tmpdir()
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	local function append(stream, etype, data)
		local code, _, err = h.run({ "append", stream, etype, data or "{}", "--db", dsn })
		assert.equal(0, code, err)
	end

	local function run_once()
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		return err
	end

	-- how often the handler ran for each position (its print lines)
	local function runs(err)
		local n = {}
		for pos in err:gmatch("ran at (%d+)") do
			pos = tonumber(pos)
			n[pos] = (n[pos] or 0) + 1
		end
		return n
	end

	local function projection(how, partitioned)
		return ([[
return {
	from = { category = "t" },
	%s
	setup = "CREATE TABLE IF NOT EXISTS ex (position bigint PRIMARY KEY, amount int CHECK (amount <> 3))",
	when = { ["*"] = function(s, e, ctx)
		print("ran at " .. e.position)
		ctx:exec("INSERT INTO ex VALUES ($1, $2)", e.position, e.data.amount)
		if e.type == "Sync" then
			%s
		end
	end },
	on_error = function() return "park" end,
}
]]):format(partitioned and 'partition = "stream",' or "",
			how == "query" and 'local r = assert(ctx:query("SELECT 1 AS one")); assert(r[1].one == "1")'
			or 'ctx:emit("out-" .. e.position, "Noted", { n = 1 })')
	end

	for _, how in ipairs({ "query", "emit" }) do
		for _, partitioned in ipairs({ false, true }) do
			local what = (partitioned and "partitioned" or "unpartitioned") .. ", ctx:" .. how
			it("charges the 2nd of 3 statements queued after a sync to its event (" .. what .. ")", function()
				h.write_file(dir .. "/p.lua", projection(how, partitioned))
				if partitioned then append("t-0", "Ok", '{"amount": 1}') end
				local base = partitioned and 1 or 0
				append("t-1", "Ok", '{"amount": 1}')
				append("t-1", "Sync", '{"amount": 1}')
				append("t-1", "Ok", '{"amount": 1}')
				append("t-1", "Ok", '{"amount": 3}') -- fails: 2nd after the sync
				append("t-1", "Ok", '{"amount": 1}')
				local err = run_once()
				local bad = base + 4
				assert.same({ bad }, positions(conn, "SELECT global_position FROM projhost.parked"))
				assert.matches("pos=" .. bad .. " event t%-1@4 %(Ok%) failed %(attempt 1%): ctx:exec: .-ex_amount_check", err)
				local all = {}
				for p = 1, base + 5 do if p ~= bad then all[#all + 1] = p end end
				assert.same(all, positions(conn, "SELECT position FROM ex"))
				local n, want = runs(err), {}
				for p = base + 1, base + 5 do want[p] = 2 end
				if partitioned then n[1] = nil end -- t-0's own job or not: not counted
				assert.same(want, n)
			end)
		end
	end

	-- The watchdog's charge for statements still queued goes to the first
	-- event that queued one (conn:pending); the job then runs one statement
	-- at a time to find the slow one. Fails when no queued event is found
	-- (the overrun charged to nothing: the batch is killed for ever).
	it("charges an overrun of statements queued after a sync to an event that queued one", function()
		h.write_file(dir .. "/p.lua", [[
return {
	from = { category = "t" },
	options = { budget = 2 },
	setup = "CREATE TABLE IF NOT EXISTS t (position bigint PRIMARY KEY)",
	when = { ["*"] = function(s, e, ctx)
		ctx:exec("INSERT INTO t VALUES ($1)", e.position)
		if e.type == "Sync" then assert(ctx:query("SELECT 1")) end
		if e.type == "Slow" then
			ctx:exec("SET LOCAL statement_timeout = 0")
			ctx:exec("SELECT pg_sleep(600)")
		end
	end },
	on_error = function() return "park" end,
}
]])
		append("t-1", "Ok")
		append("t-1", "Sync")
		append("t-1", "Slow")
		append("t-1", "Ok")
		run_once()
		local parked = assert(conn:query("SELECT global_position, error FROM projhost.parked"))
		assert.equal(1, #parked)
		assert.equal("3", parked[1].global_position)
		assert.matches("overran its budget of 2s", parked[1].error)
		assert.same({ 1, 2, 4 }, positions(conn, "SELECT position FROM t"))
	end)
end)
