-- The Lua binding of a libpq connection (core/bindings/lua_pg.c) on a real
-- PostgreSQL: the prepared statement cache of pipeline mode (core/stmt.c),
-- error indexes around Parse messages, and pages of events.
local h = require "helpers"
local core = require "projhost.core"

-- Run fn (which sends) in one pipeline and sync(true); pipeline mode is
-- left again so the caller can look at pg_prepared_statements.
-- Returns what sync(true) returned.
local function pipe(conn, fn)
	assert(conn:pipeline(true))
	fn()
	local ok, a, b, c, d = conn:sync(true)
	assert(conn:pipeline(false))
	return ok, a, b, c, d
end

-- The cache's statements on the server (only ours are named ph_<n>).
local function prepared(conn)
	return assert(conn:query([[SELECT name, statement FROM pg_prepared_statements
		WHERE name LIKE 'ph\_%' ORDER BY name]]))
end

-- The entries of prepared(conn) whose text is sql.
local function prepared_as(conn, sql)
	local out = {}
	for _, p in ipairs(prepared(conn)) do
		if p.statement == sql then out[#out + 1] = p end
	end
	return out
end

describe("pg connection", function()
	local dsn, conn

	before_each(function()
		dsn = h.fresh_db("pgspec")
		-- a raw connection: its prepared statements are all ours
		conn = h.connect(dsn)
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
		conn = nil
	end)

	describe("prepared statement cache", function()
		local SQL = "SELECT $1::int AS a"

		it("prepares a text at its second use, once, and executes it by name", function()
			for i = 1, 5 do
				local ok, res = pipe(conn, function()
					assert.equal(1, conn:send_query(SQL, i * 10))
				end)
				assert.is_true(ok, res)
				assert.same({ { a = tostring(i * 10) } }, res[1])
				local p = prepared(conn)
				if i == 1 then
					-- the first use is unnamed
					assert.same({}, p)
				else
					assert.equal(1, #p)
					assert.equal(SQL, p[1].statement)
					assert.matches("^ph_%d+$", p[1].name)
				end
			end
		end)

		it("keeps results in statement order when Parse messages are in the pipeline", function()
			local other = "SELECT $1::text || '!' AS b"
			local ok, res = pipe(conn, function()
				-- SQL: unnamed, then Parse + execute, then by name; the
				-- pending count does not include the Parse
				for i = 1, 4 do
					assert.equal(2 * i - 1, conn:send_query(SQL, i))
					assert.equal(2 * i, conn:send_query(other, "x" .. i))
				end
				assert.equal(9, conn:send("SELECT 1"))
			end)
			assert.is_true(ok, res)
			assert.equal(9, #res)
			for i = 1, 4 do
				assert.same({ { a = tostring(i) } }, res[2 * i - 1])
				assert.same({ { b = "x" .. i .. "!" } }, res[2 * i])
			end
			assert.equal(1, res[9])
			assert.equal(1, #prepared_as(conn, SQL))
			assert.equal(1, #prepared_as(conn, other))
			-- "SELECT 1" was used once
			assert.equal(2, #prepared(conn))
		end)

		it("keeps one name for a text across pipelines and send kinds", function()
			local names = {}
			for i = 1, 4 do
				local ok, res = pipe(conn, function()
					conn:send_query(SQL, i)
					conn:send(SQL, i)
				end)
				assert.is_true(ok, res)
				assert.same({ { a = tostring(i) } }, res[1])
				assert.equal(1, res[2])
				local p = prepared_as(conn, SQL)
				assert.equal(1, #p)
				names[p[1].name] = true
			end
			local n = 0
			for _ in pairs(names) do n = n + 1 end
			assert.equal(1, n)
		end)

		it("does not prepare statements run outside pipeline mode", function()
			for i = 1, 3 do
				assert.same({ { a = tostring(i) } }, (assert(conn:query(SQL, i))))
			end
			assert.same({}, prepared(conn))
		end)
	end)

	describe("a failing Parse", function()
		local BAD = "SELECT $1::nosuchtype"

		it("is reported at the first failing statement and never prepared", function()
			local ok, msg, code, idx, res = pipe(conn, function()
				conn:send(BAD, 1)
				conn:send(BAD, 2) -- second use: Parse + execute
			end)
			assert.is_nil(ok)
			assert.matches("nosuchtype", msg)
			assert.equal("42704", code)
			assert.equal(1, idx)
			assert.same({ false, false }, res)
			assert.same({}, prepared_as(conn, BAD))

			-- after a fresh sync the Parse comes again: its error belongs to
			-- the statement after it, not to the statement before it
			for round = 1, 3 do
				ok, msg, code, idx, res = pipe(conn, function()
					conn:send("SELECT 1")
					conn:send(BAD, 3)
				end)
				assert.is_nil(ok, "round " .. round)
				assert.equal("42704", code)
				assert.equal(2, idx, "round " .. round)
				assert.same({ 1, false }, res)
			end

			-- and sync() (without results) says the same
			assert(conn:pipeline(true))
			conn:send("SELECT 2")
			conn:send("SELECT 3")
			conn:send(BAD, 4)
			conn:send(BAD, 5)
			ok, msg, code, idx = conn:sync()
			assert(conn:pipeline(false))
			assert.is_nil(ok)
			assert.equal("42704", code)
			assert.equal(3, idx)
			assert.same({}, prepared_as(conn, BAD))
			-- the connection is fine afterwards
			assert.equal("1", h.scalar(conn, "SELECT 1"))
		end)

		it("that was skipped after an earlier error is sent again next time", function()
			local T = "SELECT $1::int + 1 AS n"
			assert.is_true((pipe(conn, function() conn:send_query(T, 1) end)))
			-- T's second use: its Parse is skipped because BAD failed first
			local ok, _, code, idx = pipe(conn, function()
				conn:send(BAD, 1)
				conn:send_query(T, 2)
			end)
			assert.is_nil(ok)
			assert.equal("42704", code)
			assert.equal(1, idx)
			assert.same({}, prepared_as(conn, T))
			-- not executed by a name the server never got
			local res
			ok, res = pipe(conn, function() conn:send_query(T, 3) end)
			assert.is_true(ok, res)
			assert.same({ { n = "4" } }, res[1])
			assert.equal(1, #prepared_as(conn, T))
		end)
	end)

	describe("prepared statements and transactions", function()
		local T = "SELECT $1::int * 2 AS d"

		it("survive a ROLLBACK", function()
			local ok, res = pipe(conn, function()
				conn:send("BEGIN")
				conn:send_query(T, 1)
				conn:send_query(T, 2)
				conn:send("ROLLBACK")
			end)
			assert.is_true(ok, res)
			assert.same({ { d = "2" } }, res[2])
			assert.same({ { d = "4" } }, res[3])
			local before = prepared_as(conn, T)
			assert.equal(1, #before)
			assert.is_false(conn:in_transaction())

			ok, res = pipe(conn, function() conn:send_query(T, 21) end)
			assert.is_true(ok, res)
			assert.same({ { d = "42" } }, res[1])
			assert.same(before, prepared_as(conn, T))
		end)

		it("survive a failure later in the same pipeline", function()
			assert.is_true((pipe(conn, function() conn:send_query(T, 1) end)))
			local ok, _, code, idx = pipe(conn, function()
				conn:send_query(T, 2) -- Parse succeeds here
				conn:send("SELECT 1/0")
			end)
			assert.is_nil(ok)
			assert.equal("22012", code)
			assert.equal(2, idx)
			assert.equal(1, #prepared_as(conn, T))
			local res
			ok, res = pipe(conn, function() conn:send_query(T, 5) end)
			assert.is_true(ok, res)
			assert.same({ { d = "10" } }, res[1])
			assert.equal(1, #prepared_as(conn, T))
		end)
	end)

	describe("a plan whose result type changed", function()
		local Q = "SELECT * FROM t WHERE id = $1"

		-- The use right after the ALTER: works, or fails once with 0A000.
		local function first_after_alter(col)
			local ok, a, code = pipe(conn, function() conn:send_query(Q, 1) end)
			if ok then
				assert.equal("new-" .. col, a[1][1][col])
			else
				assert.equal("0A000", code, a)
			end
			return ok
		end

		it("is prepared afresh at the next use", function()
			assert(conn:exec("CREATE TABLE t (id int PRIMARY KEY, a text)"))
			assert(conn:exec("INSERT INTO t VALUES (1, 'x')"))
			for _ = 1, 2 do
				local ok, res = pipe(conn, function() conn:send_query(Q, 1) end)
				assert.is_true(ok, res)
				assert.same({ { id = "1", a = "x" } }, res[1])
			end
			local known = {}
			local old = prepared_as(conn, Q)
			assert.equal(1, #old)
			known[old[1].name] = true

			-- twice, so the name made after the first change is dropped too
			for _, col in ipairs({ "b", "c" }) do
				assert(conn:exec("ALTER TABLE t ADD COLUMN " .. col .. " text DEFAULT 'new-" .. col .. "'"))
				local worked = first_after_alter(col)
				local ok, res = pipe(conn, function() conn:send_query(Q, 1) end)
				assert.is_true(ok, res)
				assert.equal("x", res[1][1].a)
				assert.equal("new-" .. col, res[1][1][col])
				if not worked then
					-- the stale name was given up: a new one was prepared
					local fresh = 0
					for _, p in ipairs(prepared_as(conn, Q)) do
						if not known[p.name] then fresh = fresh + 1 end
						known[p.name] = true
					end
					assert.equal(1, fresh)
				end
				-- and it stays usable
				ok, res = pipe(conn, function() conn:send_query(Q, 1) end)
				assert.is_true(ok, res)
				assert.equal("new-" .. col, res[1][1][col])
			end
			assert.equal("new-b", (assert(conn:query(Q, 1)))[1].b)
		end)
	end)

	describe("pages", function()
		local PAGE = [[SELECT global_position, transaction_id::text AS tx, event_id, stream_id, stream_version,
			event_type, data::text AS data, metadata::text AS metadata, created_at
			FROM projhost.events WHERE global_position > $1 ORDER BY global_position]]
		local truth

		before_each(function()
			assert(require("projhost.schema").migrate(conn))
			-- the worker's map (projhost.reads), handed over once
			conn:event_fields(require("projhost.reads").EVENT_FIELDS)
			assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data, metadata)
				VALUES ('acc-1', 1, 'Opened', '{"owner": "ann"}', '{"by": "test"}'),
				       ('acc-1', 2, 'Deposited', '{"amount": 5}', '{}'),
				       ('acc-2', 1, 'Opened', '{"owner": "bob"}', '{"n": 1}')]]))
			-- the same columns as text, the way the page prints them
			truth = assert(conn:query([[SELECT global_position::text AS position, transaction_id::text AS tx,
				event_id::text AS id, stream_id, stream_version::text AS version, event_type,
				data::text AS data, metadata::text AS metadata, created_at::text AS time
				FROM projhost.events ORDER BY global_position]]))
			assert.equal(3, #truth)
		end)

		-- An event table as the binding makes it, against truth row i.
		local function check_event(ev, i, page)
			local t = truth[i]
			assert.equal(tonumber(t.position), ev.position)
			assert.equal("number", type(ev.position))
			assert.equal(tonumber(t.version), ev.version)
			assert.equal("number", type(ev.version))
			assert.equal(t.stream_id, ev.stream)
			assert.equal(t.event_type, ev.type)
			for _, f in ipairs({ "id", "tx", "data", "metadata", "time", "event_id", "created_at" }) do
				assert.is_nil(rawget(ev, f), f)
			end
			assert.equal("userdata", type(ev._page))
			if page then assert.equal(page, ev._page) end
			assert.equal(i, ev._row)
			for _, f in ipairs({ "id", "tx", "data", "metadata", "time" }) do
				assert.equal(t[f], ev._page:text(ev._row, f), f)
			end
		end

		it("makes events by the map it was given, and knows no column itself", function()
			local plain = h.connect(dsn)
			-- no map: every column under its own name, as text
			local evs = assert(plain:events(PAGE, 0))
			assert.equal(3, #evs)
			assert.equal(truth[1].position, evs[1].global_position)
			assert.equal("acc-1", evs[1].stream_id)
			assert.equal(truth[1].id, evs[1].event_id)
			assert.is_nil(rawget(evs[1], "position"))
			-- another map: other names, a number, a lazy column, another end
			plain:event_fields{ eager = { { "stream_version", "v", number = true }, { "event_type", "kind" } },
				lazy = { { "data", "body" } }, last = { "event_id", "stream_version" } }
			local ok, res = pipe(plain, function() plain:send_page(PAGE, 0) end)
			assert.is_true(ok)
			local page = res[1]
			evs = page:events()
			assert.equal(2, evs[2].v)
			assert.equal("Deposited", evs[2].kind)
			assert.is_nil(rawget(evs[2], "data"))
			assert.equal(truth[2].data, page:text(2, "body"))
			assert.is_nil(page:text(2, "data"))
			local last_id, last_v = page:last()
			assert.equal(truth[3].id, last_id)
			assert.equal(1, last_v)
			-- misuse raises
			for _, bad in ipairs({
				{}, { eager = {}, lazy = {} }, { eager = { { "x" } }, lazy = {}, last = { "a", "b" } },
				{ eager = { { ("c"):rep(40), "f" } }, lazy = {}, last = { "a", "b" } },
			}) do
				assert.has_error(function() plain:event_fields(bad) end)
			end
			plain:close()
		end)

		it("send_page returns a page: count, last, events and text", function()
			local ok, res = pipe(conn, function() conn:send_page(PAGE, 0) end)
			assert.is_true(ok, res)
			local page = res[1]
			assert.equal("userdata", type(page))
			assert.equal(3, page:count())
			local tx, pos = page:last()
			assert.equal(truth[3].tx, tx)
			assert.equal(tonumber(truth[3].position), pos)
			assert.equal("number", type(pos))

			local evs = page:events()
			assert.equal(3, #evs)
			for i, ev in ipairs(evs) do check_event(ev, i, page) end
			-- a new array each call
			assert.are_not.equal(evs, page:events())
			assert.equal(3, #page:events())

			assert.is_nil(page:text(1, "nosuch"))
			assert.is_nil(page:text(1, "stream")) -- eager fields are not lazy ones
			assert.is_nil(page:text(0, "data"))
			assert.is_nil(page:text(4, "data"))
		end)

		it("is the same when its statement is prepared", function()
			local ok, res = pipe(conn, function()
				conn:send_page(PAGE, 0)
				conn:send_page(PAGE, 0) -- Parse + execute
				conn:send_page(PAGE, truth[1].position)
				conn:send_events(PAGE, 0)
			end)
			assert.is_true(ok, res)
			assert.equal(4, #res)
			for q = 1, 2 do
				assert.equal(3, res[q]:count())
				for i, ev in ipairs(res[q]:events()) do check_event(ev, i, res[q]) end
			end
			assert.equal(2, res[3]:count())
			assert.equal(tonumber(truth[2].position), res[3]:events()[1].position)
			-- send_events: event tables right away
			assert.equal("table", type(res[4]))
			assert.equal(3, #res[4])
			for i, ev in ipairs(res[4]) do check_event(ev, i) end
			assert.equal(1, #prepared_as(conn, PAGE))
		end)

		it("an empty page has no last row", function()
			local ok, res = pipe(conn, function() conn:send_page(PAGE, 1e9) end)
			assert.is_true(ok, res)
			assert.equal(0, res[1]:count())
			assert.is_nil(res[1]:last())
			assert.same({}, res[1]:events())
			assert.is_nil(res[1]:text(1, "data"))
		end)

		it("text is nil for a NULL column and for a column the query lacks", function()
			local ok, res = pipe(conn, function()
				conn:send_page([[SELECT global_position, stream_id, NULL::text AS data,
					metadata::text AS metadata FROM projhost.events ORDER BY global_position]])
			end)
			assert.is_true(ok, res)
			local page = res[1]
			assert.equal(3, page:count())
			assert.is_nil(page:text(1, "data"))
			assert.equal(truth[1].metadata, page:text(1, "metadata"))
			assert.is_nil(page:text(1, "tx"))
			assert.is_nil(page:text(1, "id"))
			-- no tx column: no place to resume from
			assert.is_nil(page:last())
			local ev = page:events()[2]
			assert.equal(tonumber(truth[2].position), ev.position)
			assert.is_nil(rawget(ev, "data"))
			assert.is_nil(rawget(ev, "metadata"))
		end)

		it("conn:events returns the same event tables outside pipeline mode", function()
			local evs = assert(conn:events(PAGE, 0))
			assert.equal(3, #evs)
			for i, ev in ipairs(evs) do check_event(ev, i) end
			assert.equal(evs[1]._page, evs[3]._page)
			-- other columns keep their name, as text
			evs = assert(conn:events("SELECT global_position, 7 AS extra FROM projhost.events ORDER BY 1"))
			assert.equal("7", evs[1].extra)
			local nothing, msg, code = conn:events("SELECT * FROM projhost.nosuch")
			assert.is_nil(nothing)
			assert.is_string(msg)
			assert.equal("42P01", code)
		end)

		it("stays valid while an event references it, and is collected after", function()
			local weak = setmetatable({}, { __mode = "v" })
			-- in a function, so no stack slot of ours keeps the results alive
			local function one_event()
				local ok, res = pipe(conn, function() conn:send_page(PAGE, 0) end)
				assert.is_true(ok, res)
				weak.page = res[1]
				return res[1]:events()[2]
			end
			local ev = one_event()
			collectgarbage()
			collectgarbage()
			assert.is_not_nil(weak.page)
			assert.equal(truth[2].data, ev._page:text(ev._row, "data"))
			assert.equal(truth[2].tx, ev._page:text(ev._row, "tx"))
			assert.equal(3, ev._page:count())

			local function events_one()
				local evs = assert(conn:events(PAGE, 0))
				weak.events_page = evs[1]._page
				return evs[3]
			end
			local ev3 = events_one()
			collectgarbage()
			collectgarbage()
			assert.equal(truth[3].metadata, ev3._page:text(ev3._row, "metadata"))

			-- once nothing refers to them the pages go (their results are freed)
			ev, ev3 = nil, nil
			collectgarbage()
			collectgarbage()
			assert.is_nil(weak.page)
			assert.is_nil(weak.events_page)
		end)
	end)

	it("keeps what is queued when pipeline(true) is called again in pipeline mode", function()
		local T = "SELECT $1::int AS a"
		assert(conn:pipeline(true))
		conn:send_query(T, 1)
		assert(conn:pipeline(true))
		conn:send_query(T, 2) -- second use: a Parse goes out first
		assert(conn:pipeline(true))
		conn:send_query(T, 3)
		local ok, res = conn:sync(true)
		assert.is_true(ok, res)
		assert.same({ { { a = "1" } }, { { a = "2" } }, { { a = "3" } } }, res)
		assert(conn:pipeline(false))
	end)

	it("prepares a text again after the session lost its statements (DEALLOCATE ALL)", function()
		local T = "SELECT $1::int AS a"
		for i = 1, 2 do pipe(conn, function() conn:send_query(T, i) end) end
		assert.equal(1, #prepared_as(conn, T))
		assert(conn:exec("DEALLOCATE ALL"))
		-- the first use fails (26000) or works; the next one works again
		pipe(conn, function() conn:send_query(T, 3) end)
		local ok, res = pipe(conn, function() conn:send_query(T, 4) end)
		assert.is_true(ok, res)
		assert.same({ { a = "4" } }, res[1])
	end)

	describe("conn:take", function()
		it("returns the first statement's result before the sync, which reads the rest", function()
			local T = "SELECT $1::int AS a"
			for round = 1, 3 do -- unnamed, then with a Parse before it, then by name
				assert(conn:pipeline(true))
				conn:send_query(T, round)
				conn:send("SELECT pg_sleep(0)")
				conn:send_query(T, round + 10)
				assert(conn:flush())
				assert.same({ { a = tostring(round) } }, conn:take())
				-- a second take reads the second statement (a count)
				assert.equal(1, conn:take())
				local ok, res = conn:sync(true)
				assert.is_true(ok, res)
				assert.is_nil(res[1])
				assert.is_nil(res[2])
				assert.same({ { a = tostring(round + 10) } }, res[3])
				assert(conn:pipeline(false))
			end
		end)

		it("reports a failed statement now and again at the sync, with its index", function()
			assert(conn:pipeline(true))
			conn:send("SELECT 1/0")
			conn:send("SELECT 1")
			assert(conn:flush())
			local r, msg, code, idx = conn:take()
			assert.is_nil(r)
			assert.matches("division by zero", msg)
			assert.same({ "22012", 1 }, { code, idx })
			local ok, msg2, code2, idx2 = conn:sync()
			assert.is_nil(ok)
			assert.matches("division by zero", msg2)
			assert.same({ "22012", 1 }, { code2, idx2 })
			assert(conn:pipeline(false))
			assert.same({ { x = "1" } }, (assert(conn:query("SELECT 1 AS x"))))
		end)

		it("raises when no statement waits for its result", function()
			assert(conn:pipeline(true))
			assert.has_error(function() conn:take() end, "conn:take: no statement is waiting for its result")
			conn:send("SELECT 1")
			assert(conn:flush())
			assert.equal(1, conn:take())
			assert.has_error(function() conn:take() end, "conn:take: no statement is waiting for its result")
			assert.is_true((conn:sync()))
			assert(conn:pipeline(false))
		end)
	end)

	it("conn:send needs pipeline mode", function()
		assert.has_error(function() conn:send("SELECT 1") end,
			"conn:send needs pipeline mode (conn:pipeline(true))")
		local c2 = assert(core.connect(dsn))
		c2:close()
		assert.has_error(function() c2:query("SELECT 1") end, "connection is closed")
	end)
end)
