-- Finished partitions (issue 14, section 3): ctx:done() in a handler marks
-- the partition done in the batch's transaction (rolled back with it); its
-- later events are not applied, discovery skips it, status shows done;
-- `projhost reset NAME` and `projhost resume NAME --partition P` reopen.
-- Every spec compares what was applied (one row per applied event under a
-- unique key: an event applied twice fails its batch) with the events.
local h = require "helpers"
local scalar = h.scalar

local function ins(conn, stream, etype)
	assert(conn:query("SELECT projhost.append($1, NULL, $2::jsonb)", stream,
		'[{"type":"' .. etype .. '","data":{}}]'))
end

-- wf: one row per applied event; Finished finishes the partition;
-- DoneThenFails finishes it and then fails (on_error skips it); Hang
-- finishes it and then loops until the watchdog SIGKILLs the worker.
local WF = [[
return {
	name = "wf",
	partition = "stream",
	from = { category = "wf" },
	options = { budget = 1 },
	setup = "CREATE TABLE IF NOT EXISTS wf_applied (stream text, version bigint, PRIMARY KEY (stream, version))",
	reset = "TRUNCATE wf_applied",
	init = function() return { n = 0 } end,
	when = {
		["*"] = function(s, e, ctx)
			ctx:exec("INSERT INTO wf_applied VALUES ($1, $2)", e.stream, e.version)
			s.n = s.n + 1
			if e.type == "Finished" then ctx:done() end
			if e.type == "DoneThenFails" then ctx:done(); error("failed after done") end
			if e.type == "Hang" then
				ctx:done()
				ctx:query("SELECT 1")
				while true do end
			end
		end,
	},
	on_error = function() return "skip" end,
}
]]

local dsn, conn, dir

local function applied(stream)
	local out = {}
	for _, r in ipairs(assert(conn:query("SELECT version FROM wf_applied WHERE stream = $1 ORDER BY version",
		stream))) do
		out[#out + 1] = tonumber(r.version)
	end
	return out
end

local function cp(stream)
	return assert(conn:query([[SELECT status, last_pos::text AS v, state->>'n' AS n FROM projhost.checkpoints
		WHERE projection = 'wf' AND partition = $1]], stream))[1]
end

local function run_once(env)
	return select(2, h.ok({ "run", "--once", dir }, dsn, { env = env, timeout = 60 }))
end

describe("finished partitions (ctx:done)", function()
	before_each(function()
		dsn, conn, dir = h.projection_db("done", { ["wf.lua"] = WF })
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("stops a partition in its batch: later events are not applied, the others go on, status shows done",
		function()
		for _, t in ipairs({ "A", "Finished", "B", "C" }) do ins(conn, "wf-1", t) end
		for _, t in ipairs({ "A", "B", "C" }) do ins(conn, "wf-2", t) end
		run_once()
		assert.same({ 1, 2 }, applied("wf-1"))
		assert.same({ 1, 2, 3 }, applied("wf-2"))
		assert.same({ status = "done", v = "2", n = "2" }, cp("wf-1"))
		assert.same({ status = "running", v = "3", n = "3" }, cp("wf-2"))
		-- later events: not read, not found behind, and --once still ends
		ins(conn, "wf-1", "D")
		ins(conn, "wf-2", "D")
		run_once()
		assert.same({ 1, 2 }, applied("wf-1"))
		assert.same({ 1, 2, 3, 4 }, applied("wf-2"))
		assert.equal("done", scalar(conn, [[SELECT status FROM projhost.partition_status
			WHERE projection = 'wf' AND partition = 'wf-1']]))
		local doc = require("projhost.json").decode(scalar(conn, "SELECT projhost.status_json('wf')::text"))
		local st = doc.projections[1].statuses
		assert.same({ 1, 0 }, { st.done, st.held })
		-- the partitions' statuses, the projection's own row not among them
		assert.same({ running = 1, paused = 0, failed = 0, stopped = 0, done = 1, held = 0 }, st)
		assert.equal(2, doc.projections[1].partitions)
		-- its events are not behind: the projection is caught up
		assert.equal("0", scalar(conn, "SELECT events_behind FROM projhost.projection_status('wf')"))
		local code, out, err = h.run({ "status", "wf", "--db", dsn })
		assert.equal(0, code, out .. err)
		assert.matches("wf%-1 [^\n]* done", out)
		-- read-your-writes: an event after the done one is handled (ignored),
		-- one before it applied, and wait_for does not wait on either
		assert.equal("ignored", scalar(conn, "SELECT projhost.applied('wf', 'wf-1', 4)"))
		assert.equal("applied", scalar(conn, "SELECT projhost.applied('wf', 'wf-1', 2)"))
		assert.equal("t", scalar(conn, "SELECT projhost.wait_for('wf', 'wf-1', 3, 0)"))
		code, out, err = h.run({ "wait", "wf", "--stream", "wf-1", "--version", "3", "--timeout", "1", "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("wf ignored wf-1@3 (its partition is done: ctx:done)\n", out)
	end)

	it("is rolled back with its batch: a handler that fails after ctx:done leaves the partition running",
		function()
		for _, t in ipairs({ "A", "DoneThenFails", "B" }) do ins(conn, "wf-3", t) end
		run_once()
		-- the failing event was skipped (nothing of it committed), B applied
		assert.same({ 1, 3 }, applied("wf-3"))
		assert.same({ status = "running", v = "3", n = "2" }, cp("wf-3"))
	end)

	it("is an error in an unpartitioned projection, given to its on_error", function()
		h.write_file(dir .. "/uf.lua", [[
return {
	name = "uf",
	from = { category = "uf" },
	when = { ["*"] = function(s, e, ctx) ctx:done() end },
	on_error = function() return "park" end,
}
]])
		ins(conn, "uf-1", "A")
		run_once()
		local err = scalar(conn, "SELECT error FROM projhost.parked WHERE projection = 'uf'")
		assert.matches("ctx:done: projection 'uf' is not partitioned", err, 1, true)
	end)

	it("resume --partition reopens one partition, reset reopens them all", function()
		for _, s in ipairs({ "wf-1", "wf-2" }) do
			for _, t in ipairs({ "A", "Finished", "B" }) do ins(conn, s, t) end
		end
		run_once()
		assert.equal("done", cp("wf-1").status)
		assert.equal("done", cp("wf-2").status)
		local code, out, err = h.run({ "resume", "wf", "--partition", "wf-1", "--db", dsn })
		assert.equal(0, code, out .. err)
		assert.matches("resumed wf (partition wf-1, 1 done)", out, 1, true)
		code, out, err = h.run({ "resume", "wf", "--partition", "nope-1", "--db", dsn })
		assert.equal(1, code, out .. err)
		run_once()
		assert.same({ 1, 2, 3 }, applied("wf-1"))
		assert.same({ 1, 2 }, applied("wf-2"))
		assert.same({ status = "running", v = "3", n = "3" }, cp("wf-1"))
		assert.equal("done", cp("wf-2").status)
		-- reset: rebuilt from the start (Finished finishes both again)
		code, out, err = h.run({ "reset", "wf", "--db", dsn })
		assert.equal(0, code, out .. err)
		ins(conn, "wf-4", "A")
		run_once()
		assert.same({ 1, 2 }, applied("wf-1"))
		assert.same({ 1, 2 }, applied("wf-2"))
		assert.same({ 1 }, applied("wf-4"))
		assert.same({ status = "done", v = "2", n = "2" }, cp("wf-1"))
		assert.same({ status = "done", v = "2", n = "2" }, cp("wf-2"))
	end)

	it("a worker SIGKILLed in the batch after ctx:done commits nothing of it", function()
		for _, t in ipairs({ "A", "Hang", "B" }) do ins(conn, "wf-5", t) end
		local err = run_once()
		-- the watchdog killed the worker in Hang (after its ctx:done); the
		-- event was then skipped and the partition never finished
		assert.matches("overran", err, 1, true)
		assert.same({ 1, 3 }, applied("wf-5"))
		assert.same({ status = "running", v = "3", n = "2" }, cp("wf-5"))
	end)

	it("two hosts at once finish every partition exactly where its handler said", function()
		assert(conn:exec([[SELECT projhost.append('wf-' || s, NULL, (SELECT jsonb_agg(jsonb_build_object('type',
				CASE WHEN v = s % 7 + 1 THEN 'Finished' ELSE 'Step' END) ORDER BY v) FROM generate_series(1, 10) v))
			FROM generate_series(1, 200) s]]))
		local args = { "run", "--workers", "2", "--db", dsn, dir }
		local env = { PROJHOST_BATCH_SIZE = 3 }
		local hosts = { h.spawn(args, { env = env }), h.spawn(args, { env = env }) }
		h.wait_until(function()
			return scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE projection = 'wf' AND status = 'done'")
				== "200"
		end, 90, "every partition done")
		for _, p in ipairs(hosts) do p:kill(15) end
		for _, p in ipairs(hosts) do assert.equal(0, p:wait(15), p:output()) end
		-- each stream applied exactly up to its Finished, once
		assert.equal("0", scalar(conn, [[SELECT count(*) FROM projhost.checkpoints c
			WHERE c.projection = 'wf' AND c.partition <> ''
			AND (c.last_pos <> split_part(c.partition, '-', 2)::int % 7 + 1 OR (c.state->>'n')::int <> c.last_pos
				OR c.last_pos <> (SELECT count(*) FROM wf_applied a WHERE a.stream = c.partition))]]))
		assert.equal(tostring(200 * 0), scalar(conn, [[SELECT count(*) FROM wf_applied a
			WHERE a.version > split_part(a.stream, '-', 2)::int % 7 + 1]]))
	end)
end)
