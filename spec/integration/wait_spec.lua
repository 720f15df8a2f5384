-- Read-your-writes (issue 13): projhost.applied / projhost.wait_for from
-- any client, exact for partitioned and unpartitioned projections and
-- immune to gaps; parked and skipped events count as handled and say so;
-- `projhost wait`.
local h = require "helpers"
local scalar = h.scalar

-- unpartitioned: a row per event in its read model; "Bad" events park,
-- "Skip" events are skipped, "Quiet" events it does not read
local WU = [[
return {
	name = "wu",
	from = { category = "wacct", types = { "Inc", "Bad", "Skip" } },
	setup = "CREATE TABLE IF NOT EXISTS wu_seen (stream text, version bigint, PRIMARY KEY (stream, version))",
	when = {
		Inc = function(s, e, ctx) ctx:exec("INSERT INTO wu_seen VALUES ($1, $2)", e.stream, e.version) end,
		Bad = function() error("bad event") end,
		Skip = function() error("skip me") end,
	},
	on_error = function(err) if tostring(err):find("skip me") then return "skip" end return "park" end,
}
]]

local WP = [[
return {
	name = "wp",
	from = { category = "wacct" },
	partition = "stream",
	setup = "CREATE TABLE IF NOT EXISTS wp_seen (stream text, version bigint, PRIMARY KEY (stream, version))",
	when = {
		Inc = function(s, e, ctx) ctx:exec("INSERT INTO wp_seen VALUES ($1, $2)", e.stream, e.version) end,
		Bad = function() error("bad event") end,
	},
	on_error = function() return "park" end,
}
]]

local function append(conn, stream, etype)
	return tonumber(scalar(conn, "SELECT projhost.append($1, NULL, $2::jsonb)", stream,
		'[{"type": "' .. (etype or "Inc") .. '"}]'))
end

local function applied(conn, p, stream, version)
	local rows, err, code = conn:query("SELECT projhost.applied($1, $2, $3) AS a", p, stream, version)
	if not rows then return nil, err, code end
	return rows[1].a
end

local function wait_for(conn, p, stream, version, ms)
	local rows, err, code = conn:query("SELECT projhost.wait_for($1, $2, $3, $4) AS ok", p, stream, version, ms)
	if not rows then return nil, err, code end
	return rows[1].ok == "t"
end

describe("read-your-writes", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("wait")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		h.write_file(dir .. "/wu.lua", WU)
		h.write_file(dir .. "/wp.lua", WP)
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("wait_for returns once the batch applying the event committed: its row is there", function()
		local host = h.spawn({ "run", "--db", dsn, dir })
		for i = 1, 5 do
			local v = append(conn, "wacct-1")
			assert.is_true(wait_for(conn, "wu", "wacct-1", v, 10000))
			-- read your write: the read model has it now
			assert.equal("1", scalar(conn, "SELECT count(*) FROM wu_seen WHERE stream = 'wacct-1' AND version = $1", v))
			assert.is_true(wait_for(conn, "wp", "wacct-1", v, 10000))
			assert.equal("1", scalar(conn, "SELECT count(*) FROM wp_seen WHERE stream = 'wacct-1' AND version = $1", v))
			assert.equal("applied", applied(conn, "wu", "wacct-1", v))
			assert.equal("applied", applied(conn, "wp", "wacct-1", v))
		end
		host:kill(15)
		host:wait(15)
	end)

	it("is exact across gaps: the event's own (transaction, position), not a high-water mark", function()
		-- A takes its transaction id first, B appends and commits first:
		-- B's position is lower, A comes first in (transaction, position)
		local a = h.connect(dsn)
		assert(a:exec("BEGIN"))
		assert(a:query("SELECT pg_current_xact_id()"))
		append(conn, "wacct-b")
		local pb = tonumber(scalar(conn, "SELECT last_position FROM projhost.streams WHERE stream_id = 'wacct-b'"))
		assert(a:query("SELECT projhost.append('wacct-a', NULL, '[{\"type\": \"Inc\"}]')"))
		assert(a:exec("COMMIT"))
		a:close()
		local pa = tonumber(scalar(conn, "SELECT last_position FROM projhost.streams WHERE stream_id = 'wacct-a'"))
		assert.is_true(pa > pb)
		-- wu applied A's event only (as a worker does, in xid order): its
		-- checkpoint is past B's position, but not past B's event
		assert(conn:exec([[UPDATE projhost.checkpoints SET (last_tx, last_pos) =
			(SELECT transaction_id, global_position FROM projhost.events WHERE stream_id = 'wacct-a')
			WHERE projection = 'wu' AND partition = '']]))
		assert.equal("applied", applied(conn, "wu", "wacct-a", 1))
		assert.equal("pending", applied(conn, "wu", "wacct-b", 1))
		assert.is_false(wait_for(conn, "wu", "wacct-b", 1, 50))
		-- partitioned: the partition's checkpoint against the version
		assert.equal("pending", applied(conn, "wp", "wacct-b", 1))
		assert(conn:exec([[INSERT INTO projhost.checkpoints (projection, partition, version, last_pos)
			VALUES ('wp', 'wacct-b', 1, 1)]]))
		assert.equal("applied", applied(conn, "wp", "wacct-b", 1))
		assert.equal("pending", applied(conn, "wp", "wacct-a", 1))
		-- the host applies B (and wu_seen gets it: A was not applied by
		-- this worker but by the UPDATE above, so only B is in wu_seen)
		local host = h.spawn({ "run", "--db", dsn, dir })
		assert.is_true(wait_for(conn, "wu", "wacct-b", 1, 10000))
		assert.equal("1", scalar(conn, "SELECT count(*) FROM wu_seen WHERE stream = 'wacct-b'"))
		assert.is_true(wait_for(conn, "wp", "wacct-a", 1, 10000))
		host:kill(15)
		host:wait(15)
	end)

	it("waits while an older transaction holds the horizon, and not for a partitioned projection", function()
		local host = h.spawn({ "run", "--db", dsn, dir })
		local holder = h.connect(dsn)
		assert(holder:exec("BEGIN"))
		assert(holder:query("SELECT pg_current_xact_id()"))
		local v = append(conn, "wacct-h")
		assert.is_true(wait_for(conn, "wp", "wacct-h", v, 10000))
		assert.is_false(wait_for(conn, "wu", "wacct-h", v, 300))
		assert.equal("pending", applied(conn, "wu", "wacct-h", v))
		assert(holder:exec("ROLLBACK"))
		holder:close()
		assert.is_true(wait_for(conn, "wu", "wacct-h", v, 10000))
		host:kill(15)
		host:wait(15)
	end)

	it("counts parked and skipped events as handled, and says which", function()
		local host = h.spawn({ "run", "--db", dsn, dir })
		local vb = append(conn, "wacct-p", "Bad")
		assert.is_true(wait_for(conn, "wu", "wacct-p", vb, 10000))
		assert.equal("parked", applied(conn, "wu", "wacct-p", vb))
		assert.is_true(wait_for(conn, "wp", "wacct-p", vb, 10000))
		assert.equal("parked", applied(conn, "wp", "wacct-p", vb))
		local vs = append(conn, "wacct-p", "Skip")
		assert.is_true(wait_for(conn, "wu", "wacct-p", vs, 10000))
		assert.equal("skipped", applied(conn, "wu", "wacct-p", vs))
		-- an event it does not read: handled once all it reads before it is
		local vq = append(conn, "wacct-p", "Quiet")
		assert.is_true(wait_for(conn, "wu", "wacct-p", vq, 10000))
		assert.equal("applied", applied(conn, "wu", "wacct-p", vq))

		-- the CLI says the same, exit 0
		local code, out, err = h.run({ "wait", "wu", "--stream", "wacct-p", "--version", tostring(vb), "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("wu parked wacct-p@" .. vb .. " (its handler failed: projhost parked list wu)\n", out)
		code, out, err = h.run({ "wait", "wu", "--stream", "wacct-p", "--version", tostring(vs), "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("wu skipped wacct-p@" .. vs .. " (its on_error said skip)\n", out)
		-- an operator's skip of a parked event: skipped too, and said so
		code, out, err = h.run({ "parked", "skip", "wu", "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("skipped", applied(conn, "wu", "wacct-p", vb))
		assert.equal("parked", applied(conn, "wp", "wacct-p", vb))
		code, out, err = h.run({ "wait", "wu", "--stream", "wacct-p", "--version", tostring(vb), "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("wu skipped wacct-p@" .. vb .. " (projhost parked skip)\n", out)
		host:kill(15)
		host:wait(15)
	end)

	it("`projhost wait` exits 0 once applied, 1 at the timeout; without a stream waits for everything before it", function()
		local v = append(conn, "wacct-c")
		local code, out, err = h.run({ "wait", "wp", "--stream", "wacct-c", "--version", tostring(v), "--timeout", "0.3",
			"--db", dsn })
		assert.equal(1, code)
		assert.equal("", out)
		assert.equal("projhost: wait: timed out after 0.3s: wp has not applied wacct-c@1 yet\n", err)
		for i = 1, 20 do append(conn, "wacct-c" .. i % 4) end
		code, out, err = h.run({ "wait", "wu", "--timeout", "0.2", "--db", dsn })
		assert.equal(1, code)
		assert.matches("timed out after 0.2s: wu has not applied everything committed before the call yet", err)
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 3 } })
		code, out, err = h.run({ "wait", "wp", "--stream", "wacct-c", "--version", tostring(v), "--timeout", "20",
			"--db", dsn })
		assert.equal(0, code, err)
		assert.equal("wp applied wacct-c@1\n", out)
		for _, p in ipairs({ "wu", "wp" }) do
			code, out, err = h.run({ "wait", p, "--timeout", "20", "--db", dsn })
			assert.equal(0, code, err)
			assert.equal(p .. " applied everything committed before the call\n", out)
			-- everything: its read model holds all 21
			assert.equal("21", scalar(conn, "SELECT count(*) FROM " .. p .. "_seen WHERE stream LIKE 'wacct-c%'"))
		end
		host:kill(15)
		host:wait(15)
		-- usage
		for _, args in ipairs({ { "wait" }, { "wait", "wu", "--stream", "x" }, { "wait", "wu", "--version", "2" },
			{ "wait", "wu", "--timeout", "soon" }, { "wait", "wu", "--stream", "x", "--version", "0" } }) do
			code, out, err = h.run(args)
			assert.equal(2, code, table.concat(args, " "))
			assert.matches("usage: projhost wait NAME", err)
		end
		code, out, err = h.run({ "wait", "nope", "--stream", "wacct-c", "--version", "1", "--db", dsn })
		assert.equal(1, code)
		assert.equal("projhost: wait: projhost.applied: no projection named 'nope'\n", err)
	end)

	it("refuses what it cannot answer, with SQLSTATEs", function()
		local v = append(conn, "wacct-e")
		local function code_of(...)
			local ok, _, code = applied(conn, ...)
			assert.is_nil(ok)
			return code
		end
		assert.equal("42704", code_of("nope", "wacct-e", v))
		assert.equal("P0002", code_of("wu", "wacct-e", v + 1))
		assert.equal("P0002", code_of("wu", "no-such-stream", 1))
		assert.equal("22023", code_of("wu", "wacct-e", 0))
		assert.equal("22023", code_of("wu", nil, 1))
		assert.equal("22023", code_of("wu", "wacct-e", nil))
		-- a partitioned projection never reads another category's streams
		append(conn, "other-1")
		assert.equal("22023", code_of("wp", "other-1", 1))
		-- unpartitioned: handled once all it reads before it is
		assert.equal("pending", applied(conn, "wu", "other-1", 1))
		local _, _, c = wait_for(conn, "wu", "wacct-e", v, -1)
		assert.equal("22023", c)
		-- its own uncommitted write can never be applied before it commits
		assert(conn:exec("BEGIN"))
		local v2 = append(conn, "wacct-e")
		_, _, c = wait_for(conn, "wu", "wacct-e", v2, 1000)
		assert.equal("25000", c)
		assert(conn:exec("ROLLBACK"))
		-- REPEATABLE READ would never see the batch commit
		assert(conn:exec("BEGIN ISOLATION LEVEL REPEATABLE READ"))
		_, _, c = wait_for(conn, "wu", "wacct-e", v, 1000)
		assert.equal("25000", c)
		assert(conn:exec("ROLLBACK"))
		-- a timeout of 0 looks once
		assert.is_false(wait_for(conn, "wu", "wacct-e", v, 0))
	end)
end)
