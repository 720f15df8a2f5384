-- One failure path (issue 10): whatever fails in a batch - a handler, a
-- pipelined ctx:exec, a set-based ctx:upsert flush, the state - every event
-- before the failing one is committed or given its own action, the failure
-- is charged to the event and the partition that caused it, and nothing is
-- skipped without its action. Every spec compares the read model and the
-- dead letters with the events themselves.
local h = require "helpers"
local scalar = h.scalar

local function ins(conn, stream, etype, data)
	assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
		VALUES ($1, coalesce((SELECT max(stream_version) FROM projhost.events WHERE stream_id = $1), 0) + 1,
			$2, $3::jsonb)]], stream, etype, data or "{}"))
	assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position, updated_at)
		SELECT stream_id, max(stream_version), max(global_position), now() FROM projhost.events
		WHERE stream_id = $1 GROUP BY 1
		ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version,
			last_position = EXCLUDED.last_position]], stream))
end

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

local function range(a, b, except)
	local out, skip = {}, {}
	for _, x in ipairs(except or {}) do skip[x] = true end
	for i = a, b do if not skip[i] then out[#out + 1] = i end end
	return out
end

-- A projection writing one row per event with ctx:upsert into an int
-- column (so {"amount": "abc"} fails at the flush) and raising in Lua on
-- events of type Boom. `extra` adds fields.
local function upserter(name, extra)
	return ([[
return {
	name = "%s",
	from = { category = "f" },
	setup = "CREATE TABLE IF NOT EXISTS %s_rows (position bigint PRIMARY KEY, stream text, amount int)",
	init = function() return { n = 0 } end,
	when = {
		["*"] = function(s, e, ctx)
			if e.type == "Boom" then error("boom at " .. e.position) end
			ctx:upsert("%s_rows", "position", { position = e.position, stream = e.stream, amount = e.data.amount })
			s.n = s.n + 1
		end,
	},
	%s
}
]]):format(name, name, name, extra or "")
end

-- One database per spec; every spec here runs hosts with --db on it.
local dsn, conn, dir

local function fresh()
	dsn = h.fresh_db("failure")
	conn = h.connect(dsn)
	assert(require("projhost.schema").migrate(conn))
	dir = h.tmpdir()
end

local function stop()
	h.stop_all()
	if conn then conn:close() end
end

describe("one failure path", function()
	before_each(fresh)
	after_each(stop)

	local function run_once(env)
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = env, timeout = 60 })
		assert.equal(0, code, out .. err)
		return err
	end

	for _, action in ipairs({ "park", "skip" }) do
		it("a flush failure and a later Lua failure in one batch lose nothing (" .. action .. ")", function()
			h.write_file(dir .. "/p.lua", upserter("p", 'on_error = function() return "' .. action .. '" end,'))
			for i = 1, 10 do
				if i == 4 then ins(conn, "f-1", "Ok", '{"amount": "abc"}')
				elseif i == 10 then ins(conn, "f-1", "Boom", "{}")
				else ins(conn, "f-1", "Ok", '{"amount": ' .. i .. '}') end
			end
			local err = run_once()
			assert.same(range(1, 9, { 4 }), positions(conn, "SELECT position FROM p_rows"))
			if action == "park" then
				assert.same({ 4, 10 }, positions(conn, "SELECT global_position FROM projhost.parked"))
			end
			-- each of the two got its own action, logged with its position
			assert.matches("pos=4 event f%-1@4 %(Ok%) failed %(attempt 1%): ctx:upsert: .- %-> " .. action, err)
			assert.matches("pos=10 event f%-1@10 %(Boom%) failed %(attempt 1%): .-boom at 10 %-> " .. action, err)
			assert.equal("10", scalar(conn, "SELECT last_pos FROM projhost.checkpoints WHERE projection = 'p'"))
			assert.equal("8", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'p'"))
		end)
	end

	it("several bad rows in one big batch are each charged to their own event", function()
		h.write_file(dir .. "/p.lua", upserter("p", 'on_error = function() return "park" end,'))
		local bad = { [17] = true, [18] = true, [250] = true, [499] = true, [500] = true }
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			SELECT 'f-' || (i % 7), i / 7 + 1, CASE WHEN i + 1 = 300 THEN 'Boom' ELSE 'Ok' END,
				CASE WHEN i + 1 = ANY($1::int[]) THEN '{"amount": "abc"}'::jsonb
					ELSE jsonb_build_object('amount', i) END
			FROM generate_series(0, 499) i ORDER BY i]], "{17,18,250,499,500}"))
		run_once({ PROJHOST_BATCH_SIZE = 1000 })
		local failed = {}
		for p in pairs(bad) do failed[#failed + 1] = p end
		failed[#failed + 1] = 300
		table.sort(failed)
		assert.same(failed, positions(conn, "SELECT global_position FROM projhost.parked"))
		assert.same(range(1, 500, failed), positions(conn, "SELECT position FROM p_rows"))
	end)

	it("a bad row in one stream of a partitioned batch is charged to that stream's event only", function()
		h.write_file(dir .. "/p.lua", upserter("p", 'partition = "stream", on_error = function() return "park" end,'))
		for round = 1, 3 do
			for s = 1, 5 do
				ins(conn, "f-" .. s, "Ok", (s == 3 and round == 2) and '{"amount": "abc"}' or '{"amount": 1}')
			end
		end
		local err = run_once()
		local parked = assert(conn:query("SELECT stream_id, stream_version FROM projhost.parked"))
		assert.equal(1, #parked, err)
		assert.same({ stream_id = "f-3", stream_version = "2" }, parked[1])
		assert.equal(14, #positions(conn, "SELECT position FROM p_rows"))
		-- every stream's checkpoint is at its end, no partition failed
		assert.equal("0", scalar(conn, [[SELECT count(*) FROM projhost.checkpoints
			WHERE projection = 'p' AND partition <> '' AND (last_pos <> 3 OR status <> 'running')]]))
		assert.equal("2", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE partition = 'f-3'"))
	end)

	it("the first event of a new partition that fails gets its action at once", function()
		h.write_file(dir .. "/p.lua", upserter("p", 'partition = "stream", on_error = function() return "park" end,'))
		ins(conn, "f-1", "Boom")
		ins(conn, "f-1", "Ok", '{"amount": 1}')
		run_once()
		assert.same({ 1 }, positions(conn, "SELECT global_position FROM projhost.parked"))
		assert.same({ 2 }, positions(conn, "SELECT position FROM p_rows"))
	end)

	it("a failing init of a new partition is charged to that partition's first event", function()
		h.write_file(dir .. "/p.lua", [[
local calls = 0
return {
	from = { category = "f" },
	partition = "stream",
	-- runs at load; after that it breaks
	init = function() calls = calls + 1 if calls > 1 then error("init broke") end return { n = 0 } end,
	when = { ["*"] = function(s) s.n = s.n + 1 end },
	on_error = function() return "park" end,
}
]])
		ins(conn, "f-1", "Ok")
		ins(conn, "f-1", "Ok")
		ins(conn, "f-2", "Ok")
		-- f-1 has a state already: only f-2 needs init
		assert(conn:exec([[INSERT INTO projhost.checkpoints (projection, partition, version, state, last_pos)
			VALUES ('p', 'f-1', 1, '{"n": 0}', 0)]]))
		run_once()
		local parked = assert(conn:query("SELECT stream_id, stream_version, error FROM projhost.parked"))
		assert.equal(1, #parked)
		assert.equal("f-2", parked[1].stream_id)
		assert.matches("init broke", parked[1].error)
		assert.equal("2", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE partition = 'f-1'"))
	end)

	it("with the default action only the bad stream fails; the other streams go on", function()
		h.write_file(dir .. "/p.lua", upserter("p", 'partition = "stream", on_error = function() return "fail" end,'))
		for round = 1, 2 do
			for s = 1, 4 do
				ins(conn, "f-" .. s, "Ok", (s == 2 and round == 1) and '{"amount": "abc"}' or '{"amount": 1}')
			end
		end
		run_once()
		local failed = assert(conn:query([[SELECT partition, last_pos FROM projhost.checkpoints
			WHERE projection = 'p' AND status = 'failed']]))
		assert.same({ { partition = "f-2", last_pos = "0" } }, failed)
		assert.equal(6, #positions(conn, "SELECT position FROM p_rows"))
	end)

	it("a failing pipelined ctx:exec in a partitioned batch is charged to its event", function()
		h.write_file(dir .. "/p.lua", [[
return {
	from = { category = "f" },
	partition = "stream",
	setup = "CREATE TABLE IF NOT EXISTS ex (position bigint PRIMARY KEY, amount int CHECK (amount <> 3))",
	when = { ["*"] = function(s, e, ctx) ctx:exec("INSERT INTO ex VALUES ($1, $2)", e.position, e.data.amount) end },
	on_error = function() return "park" end,
}
]])
		for round = 1, 3 do
			for s = 1, 4 do ins(conn, "f-" .. s, "Ok", '{"amount": ' .. ((s == 4 and round == 2) and 3 or 1) .. '}') end
		end
		run_once()
		local parked = assert(conn:query("SELECT stream_id, stream_version FROM projhost.parked"))
		assert.same({ { stream_id = "f-4", stream_version = "2" } }, parked)
		assert.equal(11, #positions(conn, "SELECT position FROM ex"))
	end)

	it("an upsert row flushed by the next event's ctx:exec is charged to the event that upserted it", function()
		h.write_file(dir .. "/p.lua", [[
return {
	from = { category = "f" },
	setup = {
		"CREATE TABLE IF NOT EXISTS up (position bigint PRIMARY KEY, amount int)",
		"CREATE TABLE IF NOT EXISTS ex (position bigint PRIMARY KEY)",
	},
	when = {
		Up = function(s, e, ctx) ctx:upsert("up", "position", { position = e.position, amount = e.data.amount }) end,
		Ex = function(s, e, ctx) ctx:exec("INSERT INTO ex VALUES ($1)", e.position) end,
	},
	on_error = function() return "park" end,
}
]])
		ins(conn, "f-1", "Up", '{"amount": 1}')
		ins(conn, "f-1", "Up", '{"amount": "abc"}')
		ins(conn, "f-1", "Ex")
		ins(conn, "f-1", "Up", '{"amount": 4}')
		run_once()
		assert.same({ 2 }, positions(conn, "SELECT global_position FROM projhost.parked"))
		assert.same({ 1, 4 }, positions(conn, "SELECT position FROM up"))
		assert.same({ 3 }, positions(conn, "SELECT position FROM ex"))
	end)

	for _, shape in ipairs({ "unpartitioned", "partitioned" }) do
		it("a state that PostgreSQL cannot store is charged to the event that made it (" .. shape .. ")", function()
			h.write_file(dir .. "/p.lua", ([[
return {
	from = { category = "f" },
	%s
	init = function() return { n = 0 } end,
	when = { ["*"] = function(s, e)
		s.n = s.n + 1
		if e.type == "Utf8" then s.bad = ("\195\169"):sub(1, 1) end
		if e.type == "Nul" then s.bad = "a\0b" end
	end },
	on_error = function() return "park" end,
}
]]):format(shape == "partitioned" and 'partition = "stream",' or ""))
			ins(conn, "f-1", "Ok")
			ins(conn, "f-1", "Utf8")
			ins(conn, "f-1", "Ok")
			ins(conn, "f-1", "Nul")
			ins(conn, "f-1", "Ok")
			local err = run_once()
			assert.same({ 2, 4 }, positions(conn, "SELECT global_position FROM projhost.parked"))
			local part = shape == "partitioned" and "f-1" or ""
			assert.equal("3", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE partition = $1", part))
			assert.matches("pos=2 .-state cannot be stored", err)
		end)
	end

	it("a handler that runs out of memory fails its event with 'not enough memory' for on_error", function()
		h.write_file(dir .. "/p.lua", [[
return {
	from = { category = "f" },
	init = function() return { n = 0 } end,
	when = {
		Ok = function(s) s.n = s.n + 1 end,
		-- millions of small tables, kept in the state
		Hog = function(s) s.hog = {} for i = 1, 1e9 do s.hog[i] = { i } end end,
	},
	on_error = function(err) return "park" end,
	options = { budget = 10 },
}
]])
		ins(conn, "f-1", "Ok")
		ins(conn, "f-1", "Hog")
		ins(conn, "f-1", "Ok")
		run_once({ PROJHOST_WORKER_MEMORY_MB = 300 })
		local parked = assert(conn:query("SELECT global_position, error FROM projhost.parked"))
		assert.equal(1, #parked)
		assert.equal("2", parked[1].global_position)
		if (os.getenv("PROJHOST_BIN") or ""):find("asan", 1, true) then
			-- sanitizer builds run without the memory cap (see errors_spec)
			assert.is_truthy(parked[1].error:find("not enough memory", 1, true)
				or parked[1].error:find("overran its budget", 1, true))
		else
			assert.matches("p%.lua: not enough memory", parked[1].error)
		end
		assert.equal("2", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'p'"))
	end)

	it("a failing caught_up never undoes a batch, shows in status, and --once ends", function()
		h.write_file(dir .. "/p.lua", upserter("p", 'caught_up = function(ctx) error("hook broke") end,'))
		for _ = 1, 5 do ins(conn, "f-1", "Ok", '{"amount": 1}') end
		local err = run_once()
		assert.equal(5, #positions(conn, "SELECT position FROM p_rows"))
		assert.equal("5", scalar(conn, "SELECT last_pos FROM projhost.checkpoints WHERE projection = 'p'"))
		assert.matches("caught_up failed: .-hook broke", err)
		local _, out = h.run({ "status", "--db", dsn })
		assert.matches("hook broke", out)
	end)

	it("retry with a delay that is not a finite number uses the default delay", function()
		h.write_file(dir .. "/p.lua", upserter("p", [[on_error = function(err, e, attempt)
			if attempt == 1 then return "retry", 0/0 end
			if attempt == 2 then return "retry", math.huge end
			return "skip" end,]]))
		ins(conn, "f-1", "Boom")
		ins(conn, "f-1", "Ok", '{"amount": 1}')
		local err = run_once()
		assert.is_nil(err:find("nan", 1, true))
		assert.is_nil(err:find("inf", 1, true))
		assert.matches("attempt 3%).- %-> skip", err)
		assert.same({ 2 }, positions(conn, "SELECT position FROM p_rows"))
	end)
end)

describe("projections sharing a worker", function()
	before_each(fresh)
	after_each(stop)

	it("one projection's session settings never reach another's statements", function()
		-- one worker, so one connection: the setter's batch runs first,
		-- then the user's events arrive
		h.write_file(dir .. "/setter.lua", [[
return {
	from = { category = "set" },
	when = { ["*"] = function(s, e, ctx)
		ctx:exec("SET search_path = nowhere")
		ctx:exec("SET TimeZone = 'America/New_York'")
		ctx:exec("SET DateStyle = 'SQL, DMY'")
		-- last: 1 ms would cancel its own next statements now and then
		ctx:exec("SET statement_timeout = 1")
	end },
}
]])
		h.write_file(dir .. "/user.lua", [[
return {
	from = { category = "use" },
	setup = "CREATE TABLE IF NOT EXISTS public.b_rows (position bigint PRIMARY KEY, t text, now text)",
	when = { ["*"] = function(s, e, ctx)
		ctx:exec("SELECT pg_sleep(0.01)")
		ctx:exec("INSERT INTO b_rows VALUES ($1, $2, now()::text)", e.position, e.time)
	end },
}
]])
		local host = h.spawn({ "run", "--db", dsn, dir })
		h.wait_until(function() return host:output():find("serving 2", 1, true) end, 20, "the host")
		ins(conn, "set-1", "Ok")
		h.wait_until(function()
			return scalar(conn, "SELECT last_pos FROM projhost.checkpoints WHERE projection = 'setter'") == "1"
		end, 20, "the setter's batch")
		for _ = 1, 3 do ins(conn, "use-1", "Ok") end
		h.wait_until(function()
			local r = conn:query("SELECT count(*) AS n FROM b_rows")
			return r and r[1].n == "3"
		end, 20, "the user's rows")
		host:kill(15)
		host:wait(10)
		assert.is_nil(host:output():find("ERROR", 1, true), host:output())
		-- times as the host writes them (UTC, ISO), in both columns
		assert.equal("0", scalar(conn, "SELECT count(*) FROM b_rows WHERE t NOT LIKE '%Z' OR now NOT LIKE '%+00'"))
	end)

	it("setup may hold several statements; a failing setup is logged once per load", function()
		h.write_file(dir .. "/two.lua", [[
return {
	from = { category = "f" },
	setup = "CREATE TABLE IF NOT EXISTS two_a (x int); CREATE TABLE IF NOT EXISTS two_b (y int)",
	when = { ["*"] = function(s, e, ctx) ctx:exec("INSERT INTO two_b VALUES (1)") end },
}
]])
		h.write_file(dir .. "/broken.lua", [[
return {
	from = { category = "f" },
	setup = "CREATE TABLE broken_t (x nosuchtype)",
	when = { ["*"] = function() end },
}
]])
		for _ = 1, 3 do ins(conn, "f-1", "Ok") end
		local host = h.spawn({ "run", "--db", dsn, dir })
		local function rows_b()
			local r = conn:query("SELECT count(*) AS n FROM two_b")
			return r and tonumber(r[1].n)
		end
		h.wait_until(function() return rows_b() == 3 end, 20, "two_b rows")
		-- wake-ups keep coming; the broken setup must not be logged for each
		for _ = 1, 20 do ins(conn, "f-1", "Ok"); require("projhost.core").sleep(0.05) end
		h.wait_until(function() return rows_b() == 23 end, 20, "two_b rows")
		host:kill(15)
		host:wait(10)
		local _, n = host:output():gsub("nosuchtype", "")
		assert.equal(1, n, host:output())
	end)

	it("a projection does not receive the events it emitted itself unless it opts in", function()
		h.write_file(dir .. "/echo.lua", [[
return {
	from = { all = true },
	init = function() return { n = 0 } end,
	when = { ["*"] = function(s, e, ctx) s.n = s.n + 1; ctx:emit("echo-1", "Echoed", { of = e.position }) end },
}
]])
		h.write_file(dir .. "/own.lua", [[
return {
	from = { category = "own" },
	options = { own_events = true },
	init = function() return { n = 0 } end,
	when = { ["*"] = function(s, e, ctx) s.n = s.n + 1; if s.n < 3 then ctx:emit("own-1", "Again", {}) end end },
}
]])
		ins(conn, "f-1", "Ok")
		ins(conn, "f-1", "Ok")
		ins(conn, "own-1", "Start")
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		-- echo saw the three originals and the two events own emitted, not its own echoes
		assert.equal("5", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'echo'"))
		assert.equal("5", scalar(conn, "SELECT count(*) FROM projhost.events WHERE stream_id = 'echo-1'"))
		-- own received its own two emits: Start, Again, Again
		assert.equal("3", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'own'"))
	end)
end)

describe("the budget covers all projection code", function()
	before_each(fresh)
	after_each(stop)

	local function run_once()
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { timeout = 90 })
		assert.equal(0, code, out .. err)
		return err
	end

	it("an endless on_error gets the default action, logged with the projection and file", function()
		h.write_file(dir .. "/p.lua", [[
return {
	from = { category = "f" },
	options = { budget = 1 },
	when = { ["*"] = function(s, e) if e.type == "Boom" then error("boom") end end },
	on_error = function() local n = 0 while true do n = n + 1 end end,
}
]])
		ins(conn, "f-1", "Boom")
		local err = run_once()
		assert.matches("p pos=1 [^\n]*p%.lua: on_error[^\n]*budget[^\n]*default action", err)
		-- the default: three retries, then fail
		assert.equal("failed", scalar(conn, "SELECT status FROM projhost.checkpoints WHERE projection = 'p'"))
	end)

	it("an endless caught_up is reported and the projection keeps its batches", function()
		h.write_file(dir .. "/p.lua", [[
return {
	from = { category = "f" },
	options = { budget = 1 },
	init = function() return { n = 0 } end,
	when = { ["*"] = function(s) s.n = s.n + 1 end },
	caught_up = function() while true do end end,
}
]])
		ins(conn, "f-1", "Ok")
		ins(conn, "f-1", "Ok")
		local err = run_once()
		assert.matches("caught_up failed: [^\n]*budget", err)
		assert.equal("2", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'p'"))
	end)

	it("handler SQL that turns the statement timeout off still runs under the budget", function()
		h.write_file(dir .. "/p.lua", [[
return {
	from = { category = "f" },
	options = { budget = 2 },
	setup = "CREATE TABLE IF NOT EXISTS t (position bigint PRIMARY KEY)",
	when = { ["*"] = function(s, e, ctx)
		if e.type == "Slow" then
			ctx:exec("SET LOCAL statement_timeout = 0")
			ctx:exec("SELECT pg_sleep(600)")
		end
		ctx:exec("INSERT INTO t VALUES ($1)", e.position)
	end },
	on_error = function() return "park" end,
}
]])
		ins(conn, "f-1", "Ok")
		ins(conn, "f-1", "Slow")
		ins(conn, "f-1", "Ok")
		run_once()
		local parked = assert(conn:query("SELECT global_position, error FROM projhost.parked"))
		assert.equal(1, #parked)
		assert.equal("2", parked[1].global_position)
		assert.matches("overran its budget of 2s", parked[1].error)
		assert.same({ 1, 3 }, positions(conn, "SELECT position FROM t"))
	end)

	it("a file that loops at load is reported and left out; saving one into a running host keeps it serving", function()
		h.write_file(dir .. "/good.lua", [[
return { from = { category = "f" }, init = function() return { n = 0 } end,
	when = { ["*"] = function(s) s.n = s.n + 1 end } }
]])
		h.write_file(dir .. "/loops.lua", "while true do end\nreturn {}\n")
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BUDGET = 1 } })
		h.wait_until(function() return host:output():find("serving 1 projection", 1, true) end, 30, "the host")
		assert.matches("loops%.lua: loading overran its budget", host:output())
		ins(conn, "f-1", "Ok")
		h.wait_until(function()
			return scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'good'") == "1"
		end, 20, "the good projection")
		-- a hot reload of another looping file
		h.write_file(dir .. "/loops2.lua", "local x = 0 while true do x = x + 1 end\nreturn {}\n")
		h.wait_until(function() return host:output():find("loops2%.lua: loading overran") end, 30, "the reload")
		ins(conn, "f-1", "Ok")
		h.wait_until(function()
			return scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'good'") == "2"
		end, 20, "the good projection after the reload")
		host:kill(15)
		assert.equal(0, host:wait(15), host:output())
	end)
end)
