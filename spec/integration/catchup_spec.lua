-- New short partitions caught up by the discovery walk itself
-- (worker/catchup.lua): exactly once with two hosts on one fresh store,
-- after a SIGKILL in the middle, and a version still in flight holds its
-- partition (it goes to the job path, which waits for it).
local h = require "helpers"
local scalar = h.scalar

-- as partition_spec's: a count per stream, the last version in the state
-- (an event out of order raises), one row per applied event - without a
-- unique key, so that an event applied twice shows as two rows (a key
-- would fail the second batch, which the job path then redoes right: it
-- would hide the bug); any error fails the partition, which the checks
-- below see
local PBAL = [[
return {
	name = "pbal",
	from = { category = "pacct" },
	partition = "stream",
	setup = {
		"CREATE TABLE IF NOT EXISTS pcount (stream text PRIMARY KEY, n bigint NOT NULL)",
		"CREATE TABLE IF NOT EXISTS papplied (stream text, version bigint)",
	},
	init = function() return { last = 0, n = 0 } end,
	when = {
		Inc = function(s, e, ctx)
			if e.version ~= s.last + 1 then
				error("out of order: " .. e.stream .. " got " .. e.version .. " after " .. s.last)
			end
			s.last, s.n = e.version, s.n + 1
			SLOW
			ctx:exec("INSERT INTO pcount VALUES ($1, 1) ON CONFLICT (stream) DO UPDATE SET n = pcount.n + 1", e.stream)
			ctx:exec("INSERT INTO papplied VALUES ($1, $2)", e.stream, e.version)
		end,
	},
	on_error = function() return "fail" end,
}
]]

local function applied(conn)
	-- (0 until the projection's setup made the table)
	if not scalar(conn, "SELECT to_regclass('papplied')") then return 0 end
	return tonumber(scalar(conn, "SELECT count(*) FROM papplied"))
end

-- the read model, the states and the checkpoints say what the events say
local function assert_matches_truth(conn)
	local truth = assert(conn:query([[SELECT stream_id AS stream, count(*)::text AS n
		FROM projhost.events WHERE stream_id LIKE 'pacct-%' GROUP BY 1 ORDER BY 1]]))
	local model = assert(conn:query("SELECT stream, n::text AS n FROM pcount ORDER BY 1"))
	assert.equal(#truth, #model)
	assert.same(truth, model)
	assert.equal(scalar(conn, "SELECT count(*) FROM projhost.events WHERE stream_id LIKE 'pacct-%'"),
		scalar(conn, "SELECT count(*) FROM papplied"))
	assert.equal("0", scalar(conn, [[SELECT count(*) FROM (SELECT 1 FROM papplied
		GROUP BY stream, version HAVING count(*) > 1) twice]]))
	local bad = scalar(conn, [[SELECT count(*) FROM projhost.checkpoints c
		JOIN projhost.streams s ON s.stream_id = c.partition
		WHERE c.projection = 'pbal' AND ((c.state->>'last')::bigint <> s.version
			OR (c.state->>'n')::bigint <> s.version OR c.last_pos <> s.version)]])
	assert.equal("0", bad)
	assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status <> 'running'"))
end

-- partitions the walk caught up, as its debug lines count them
local function caught_by_walk(out)
	local n = 0
	for k in out:gmatch("discovery caught up (%d+) of %d+ new partitions") do n = n + tonumber(k) end
	return n
end

describe("new partitions caught up by discovery", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("catchup")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		assert.equal(0, (h.run({ "status", "--db", dsn })))
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("applies each event once with two hosts on the same fresh store", function()
		h.write_file(dir .. "/pbal.lua", (PBAL:gsub("SLOW", "")))
		-- 6,000 events over 3,000 streams (two walk pages' worth of chunks),
		-- and 30 long streams that take the job path
		h.insert_events(conn, "pacct", 6000, 3000)
		h.insert_events(conn, "pacct-long", 600, 30)
		local env = { PROJHOST_DEBUG = "1" }
		local args = { "run", "--once", "--workers", "2", "--db", dsn, dir }
		local a, b = h.spawn(args, { env = env }), h.spawn(args, { env = env })
		assert.equal(0, a:wait(120), a:output())
		assert.equal(0, b:wait(120), b:output())
		assert_matches_truth(conn)
		assert.equal(6600, applied(conn))
		-- the walk did catch partitions up (else this spec tests the job path)
		assert.is_true(caught_by_walk(a:output()) + caught_by_walk(b:output()) > 0)
	end)

	it("commits whole chunks only: a host SIGKILLed in the middle leaves nothing half-applied", function()
		-- 2 ms an event: a chunk of 1,024 takes 2 s, the kill lands in one
		h.write_file(dir .. "/pbal.lua", (PBAL:gsub("SLOW", 'ctx:query("SELECT pg_sleep(0.002)")')))
		h.insert_events(conn, "pacct", 3000, 3000)
		local env = { PROJHOST_DEBUG = "1" }
		local host = h.spawn({ "run", "--workers", "1", "--db", dsn, dir }, { env = env })
		h.wait_until(function() return applied(conn) >= 1 end, 60, "a chunk committed")
		host:kill(9)
		host:wait(10)
		-- its worker's session gone too (its transaction rolled back)
		h.wait_until(function()
			return scalar(conn, [[SELECT count(*) FROM pg_stat_activity
				WHERE application_name = 'projhost worker']]) == "0"
		end, 30, "the worker's session to end")
		local n = applied(conn)
		assert.is_true(n < 3000, "the kill came too late to test anything")
		-- whole chunks only (1,024 partitions of one event each)
		assert.equal(0, n % 1024)
		local code, out, err = h.run({ "run", "--once", "--workers", "1", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		assert_matches_truth(conn)
		assert.equal(3000, applied(conn))
	end)

	it("holds a new partition behind a version still in flight and applies it in order once it commits", function()
		h.write_file(dir .. "/pbal.lua", (PBAL:gsub("SLOW", "")))
		h.insert_events(conn, "pacct", 20, 10)
		-- pacct-gap: version 1 in an open transaction, version 2 (and its
		-- streams row) committed
		local open = h.connect(dsn)
		assert(open:exec("BEGIN"))
		assert(open:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type)
			VALUES ('pacct-gap', 1, 'Inc')]]))
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type)
			VALUES ('pacct-gap', 2, 'Inc')]]))
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			SELECT stream_id, 2, global_position FROM projhost.events
			WHERE stream_id = 'pacct-gap' AND stream_version = 2]]))
		local host = h.spawn({ "run", "--workers", "1", "--db", dsn, dir }, { env = { PROJHOST_DEBUG = "1" } })
		h.wait_until(function() return host:output():find("discovery caught up 10 of 11 new partitions", 1, true) end,
			60, "the walk to catch up all but pacct-gap")
		assert.equal(20, applied(conn))
		-- held, not applied out of order, not failed
		assert.equal("0", scalar(conn, "SELECT count(*) FROM papplied WHERE stream = 'pacct-gap'"))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status <> 'running'"))
		assert(open:exec("COMMIT"))
		open:close()
		h.wait_until(function() return applied(conn) == 22 end, 60, "pacct-gap applied")
		host:kill(15)
		assert.equal(0, host:wait(15), host:output())
		assert_matches_truth(conn)
	end)

	it("stores a batch's states a slice at a time, yet a failure in a late slice costs only its event", function()
		-- chunks and jobs of more than 256 partitions store their states a
		-- slice (transact.lua's SLICE_GROUPS) at a time while the handlers
		-- go on: a handler's error, and a state PostgreSQL refuses, in a
		-- late slice must still roll the whole batch back and cost only
		-- their own event (skip), nothing applied twice or lost
		local src = PBAL:gsub("SLOW", [[
			if e.stream == "pacct-700" or (e.stream == "pacct-long-250" and e.version == 6) then
				error("boom")
			end
			if e.stream == "pacct-900" then s.bad = "\255" end]]):gsub('return "fail"', 'return "skip"')
		h.write_file(dir .. "/pbal.lua", src)
		-- 1,000 new streams of one event (a chunk of the walk, which fails
		-- and runs as one job), 300 of six (jobs of the master)
		h.insert_events(conn, "pacct", 1000, 1000)
		h.insert_events(conn, "pacct-long", 1800, 300)
		local code, out, err = h.run({ "run", "--once", "--workers", "1", "--db", dsn, dir },
			{ env = { PROJHOST_DEBUG = "1" } })
		assert.equal(0, code, out .. err)
		-- every event once, but the three skipped ones
		assert.equal(2797, applied(conn))
		assert.equal("0", scalar(conn, [[SELECT count(*) FROM (SELECT 1 FROM papplied
			GROUP BY stream, version HAVING count(*) > 1) twice]]))
		assert.equal("0", scalar(conn, [[SELECT count(*) FROM papplied
			WHERE stream IN ('pacct-700', 'pacct-900') OR (stream = 'pacct-long-250' AND version = 6)]]))
		-- and every checkpoint at its stream's end, running
		assert.equal("1300", scalar(conn, [[SELECT count(*) FROM projhost.checkpoints c
			JOIN projhost.streams s ON s.stream_id = c.partition
			WHERE c.projection = 'pbal' AND c.last_pos = s.version AND c.status = 'running']]))
	end)

	it("misses nothing appended while a walk of several pages reads each next page ahead", function()
		h.write_file(dir .. "/pbal.lua", (PBAL:gsub("SLOW", "")))
		-- 11,000 new streams: three walk pages (discovery.lua's FIND_WALK),
		-- each read ahead by the last chunk of the one before
		h.insert_events(conn, "pacct", 11000, 11000)
		local host = h.spawn({ "run", "--workers", "1", "--db", dsn, dir }, { env = { PROJHOST_DEBUG = "1" } })
		-- meanwhile: events for streams behind and ahead of the walk, and
		-- new streams, while it runs
		local appender = h.connect(dsn)
		for i = 1, 300 do
			local stream = i % 3 == 0 and ("pacct-x" .. i) or ("pacct-" .. (i * 37) % 11000)
			assert(appender:query([[SELECT projhost.append($1, NULL, '[{"type":"Inc"}]')]], stream))
		end
		appender:close()
		h.wait_until(function() return applied(conn) == 11300 end, 60, "every event applied")
		host:kill(15)
		assert.equal(0, host:wait(15), host:output())
		assert_matches_truth(conn)
		assert.is_true(caught_by_walk(host:output()) > 5000, host:output())
	end)
end)
