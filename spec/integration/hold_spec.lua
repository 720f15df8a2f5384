-- Held partitions (issue 14, section 4): on_error returning "hold" parks
-- the event and its partition's later events wait behind it (status held,
-- listed by `parked list`) while the other partitions go on; `parked
-- retry` applies the held event and then the rest in order, `parked skip`
-- drops it and releases the rest. "retry", delay, { silent = true } retries
-- without an error line per attempt. Applied events are rows under a
-- unique key (an event applied twice fails its batch), in a sequence that
-- shows their order.
local h = require "helpers"
local scalar = h.scalar

local function ins(conn, stream, etype)
	assert(conn:query("SELECT projhost.append($1, NULL, $2::jsonb)", stream,
		'[{"type":"' .. etype .. '","data":{}}]'))
end

-- Poison fails until a row is in hp_fix; Flaky always fails (retried
-- silently twice, then skipped).
local HP = [[
return {
	name = "hp",
	partition = "stream",
	from = { category = "hp" },
	setup = {
		"CREATE TABLE IF NOT EXISTS hp_applied (seq bigserial, stream text, version bigint, PRIMARY KEY (stream, version))",
		"CREATE TABLE IF NOT EXISTS hp_fix (x int)",
	},
	when = {
		["*"] = function(s, e, ctx)
			if e.type == "Poison" and ctx:query("SELECT count(*) AS n FROM hp_fix")[1].n == "0" then
				error("poison " .. e.stream .. "@" .. e.version)
			end
			if e.type == "Flaky" then error("flaky") end
			ctx:exec("INSERT INTO hp_applied (stream, version) VALUES ($1, $2)", e.stream, e.version)
		end,
	},
	on_error = function(err, e, attempt)
		if e.type == "Flaky" then
			if attempt <= 2 then return "retry", 0, { silent = true } end
			return "skip"
		end
		return "hold"
	end,
}
]]

local dsn, conn, dir

local function applied(stream)
	local out = {}
	for _, r in ipairs(assert(conn:query("SELECT version FROM hp_applied WHERE stream = $1 ORDER BY seq", stream))) do
		out[#out + 1] = tonumber(r.version)
	end
	return out
end

local function cp(stream)
	return assert(conn:query([[SELECT status, last_pos::text AS v FROM projhost.checkpoints
		WHERE projection = 'hp' AND partition = $1]], stream))[1]
end

local function run_once()
	return select(2, h.ok({ "run", "--once", dir }, dsn, { timeout = 60 }))
end

local function cli(...)
	return (h.ok({ ... }, dsn))
end

describe("held partitions (on_error \"hold\")", function()
	before_each(function()
		dsn, conn, dir = h.projection_db("hold", { ["hp.lua"] = HP })
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	-- hp-1 held at version 2 (A, Poison, B, C), hp-2 applied (A, B)
	local function held()
		for _, t in ipairs({ "A", "Poison", "B", "C" }) do ins(conn, "hp-1", t) end
		for _, t in ipairs({ "A", "B" }) do ins(conn, "hp-2", t) end
		run_once()
		assert.same({ 1 }, applied("hp-1"))
		assert.same({ 1, 2 }, applied("hp-2"))
		assert.same({ status = "held", v = "1" }, cp("hp-1"))
	end

	it("holds the partition behind the event; the others go on; parked list and status show it", function()
		held()
		local rows = assert(conn:query("SELECT stream_id, stream_version, hold FROM projhost.parked"))
		assert.same({ { stream_id = "hp-1", stream_version = "2", hold = "t" } }, rows)
		assert.matches("hp%-1@2 Poison +held", cli("parked", "list", "hp"))
		assert.equal("held", scalar(conn, [[SELECT status FROM projhost.partition_status
			WHERE projection = 'hp' AND partition = 'hp-1']]))
		assert.matches("hp%-1 [^\n]* held", cli("status", "hp"))
		-- later events wait too; --once still ends
		ins(conn, "hp-1", "D")
		ins(conn, "hp-2", "C")
		run_once()
		assert.same({ 1 }, applied("hp-1"))
		assert.same({ 1, 2, 3 }, applied("hp-2"))
		assert.equal("pending", scalar(conn, "SELECT projhost.applied('hp', 'hp-1', 3)"))
		-- resume does not release it (parked retry|skip does)
		assert.matches("held behind a parked event", cli("resume", "hp", "--partition", "hp-1"), 1, true)
		assert.equal("held", cp("hp-1").status)
	end)

	it("parked retry applies the held event and then the rest, in order", function()
		held()
		assert(conn:exec("INSERT INTO hp_fix VALUES (1)"))
		assert.matches("released 1 held partition", cli("parked", "retry", "hp"), 1, true)
		run_once()
		assert.same({ 1, 2, 3, 4 }, applied("hp-1"))
		assert.same({ status = "running", v = "4" }, cp("hp-1"))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.parked"))
	end)

	it("a held event that fails again on retry is held again", function()
		held()
		cli("parked", "retry", "hp")
		run_once()
		assert.same({ 1 }, applied("hp-1"))
		assert.same({ status = "held", v = "1" }, cp("hp-1"))
		assert.equal("1", scalar(conn, "SELECT count(*) FROM projhost.parked WHERE hold"))
	end)

	it("a reset drops the old version's dead letters: the rebuild holds the event anew, once", function()
		h.write_file(dir .. "/hp.lua", (HP:gsub("\tsetup = {", '\treset = { "DELETE FROM hp_applied" },\n\tsetup = {', 1)))
		held()
		assert.matches("reset hp", cli("reset", "hp"), 1, true)
		run_once()
		assert.same({ 1 }, applied("hp-1"))
		assert.same({ 1, 2 }, applied("hp-2"))
		assert.same({ status = "held", v = "1" }, cp("hp-1"))
		-- one dead letter, the rebuild's: `parked retry` cannot apply it twice
		local rows = assert(conn:query("SELECT stream_id, stream_version, hold FROM projhost.parked"))
		assert.same({ { stream_id = "hp-1", stream_version = "2", hold = "t" } }, rows)
		assert(conn:exec("INSERT INTO hp_fix VALUES (1)"))
		cli("parked", "retry", "hp")
		run_once()
		assert.same({ 1, 2, 3, 4 }, applied("hp-1"))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.parked"))
	end)

	it("parked skip drops the held event and releases the rest", function()
		held()
		assert.matches("skipped 1 parked event", cli("parked", "skip", "hp"), 1, true)
		run_once()
		assert.same({ 1, 3, 4 }, applied("hp-1"))
		assert.same({ status = "running", v = "4" }, cp("hp-1"))
		assert.equal("skipped", scalar(conn, "SELECT projhost.applied('hp', 'hp-1', 2)"))
	end)

	it("retry with { silent = true } logs no error line per attempt, and counts them", function()
		for _, t in ipairs({ "A", "Flaky", "B" }) do ins(conn, "hp-9", t) end
		local err = run_once()
		assert.same({ 1, 3 }, applied("hp-9"))
		assert.is_nil(err:find("(attempt 1)", 1, true), err)
		assert.is_nil(err:find("(attempt 2)", 1, true), err)
		assert.matches("hp%-9@2 %(Flaky%) failed %(attempt 3%): .-flaky %-> skip", err)
		assert.equal("3", scalar(conn, "SELECT attempts FROM projhost.checkpoints WHERE partition = 'hp-9'"))
	end)

	it("/metrics counts held events and silent retries by action", function()
		for _, t in ipairs({ "A", "Poison", "B" }) do ins(conn, "hp-1", t) end
		for _, t in ipairs({ "A", "Flaky", "B" }) do ins(conn, "hp-9", t) end
		local host = h.spawn({ "run", "--db", dsn, "--http", "127.0.0.1:0", dir })
		local addr = h.wait_until(function()
			return host:output():match("serving HTTP on http://(127%.0%.0%.1:%d+)/")
		end, 20, "the HTTP address")
		h.wait_until(function()
			local ok, st = pcall(cp, "hp-1")
			return ok and st and st.status == "held" and #applied("hp-9") == 2
		end, 30, "hp-1 held and hp-9 done")
		local body = h.read_all("curl -s --max-time 10 http://" .. addr .. "/metrics")
		for action, n in pairs({ hold = 1, retry = 2, skip = 1 }) do
			assert.matches(('\nprojhost_handler_errors_total{projection="hp",action="%s"} %d\n'):format(action, n),
				body, 1, true)
		end
		assert.matches('\nprojhost_parked_events{projection="hp"} 1\n', body, 1, true)
	end)

	it("an unpartitioned projection parks instead, with a warning", function()
		h.write_file(dir .. "/uh.lua", [[
return {
	name = "uh",
	from = { category = "uh" },
	when = { ["*"] = function(s, e) if e.type == "Poison" then error("poison") end end },
	on_error = function() return "hold" end,
}
]])
		for _, t in ipairs({ "A", "Poison", "B" }) do ins(conn, "uh-1", t) end
		local err = run_once()
		assert.matches("on_error returned hold, which needs a partitioned projection", err, 1, true)
		assert.same({ { v = "2", hold = "f" } }, assert(conn:query([[SELECT stream_version::text AS v, hold
			FROM projhost.parked WHERE projection = 'uh']])))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status <> 'running'"))
	end)

	it("two hosts, one SIGKILLed midway: held partitions wait, the rest apply once, retry releases them",
		function()
		-- 300 streams of 8 events; every 10th has a Poison at version 3
		assert(conn:exec([[SELECT projhost.append('hp-' || s, NULL, (SELECT jsonb_agg(jsonb_build_object('type',
				CASE WHEN s % 10 = 0 AND v = 3 THEN 'Poison' ELSE 'Step' END) ORDER BY v) FROM generate_series(1, 8) v))
			FROM generate_series(1, 300) s]]))
		local args = { "run", "--workers", "2", "--db", dsn, dir }
		local env = { PROJHOST_BATCH_SIZE = 3 }
		local a, b = h.spawn(args, { env = env }), h.spawn(args, { env = env })
		h.wait_until(function()
			local ok, n = pcall(scalar, conn, "SELECT count(*) FROM hp_applied") -- made by the hosts' setup
			return ok and tonumber(n) > 300
		end, 60, "some events applied")
		a:kill(9)
		local expected = 270 * 8 + 30 * 2
		h.wait_until(function()
			return tonumber(scalar(conn, "SELECT count(*) FROM hp_applied")) == expected
				and scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status = 'held'") == "30"
		end, 90, "everything but the held partitions applied")
		assert.equal("30", scalar(conn, "SELECT count(*) FROM projhost.parked WHERE hold AND stream_version = 3"))
		assert(conn:exec("INSERT INTO hp_fix VALUES (1)"))
		local c = h.spawn(args, { env = env })
		cli("parked", "retry", "hp")
		h.wait_until(function()
			return tonumber(scalar(conn, "SELECT count(*) FROM hp_applied")) == 300 * 8
		end, 90, "the held partitions released")
		for _, p in ipairs({ b, c }) do p:kill(15) end
		for _, p in ipairs({ b, c }) do assert.equal(0, p:wait(15), p:output()) end
		-- each stream's events applied once each, in version order
		assert.equal("0", scalar(conn, [=[SELECT count(*) FROM (SELECT stream,
				array_agg(version ORDER BY seq) AS vs FROM hp_applied GROUP BY stream) x
			WHERE vs <> ARRAY[1, 2, 3, 4, 5, 6, 7, 8]::bigint[]]=]))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status <> 'running'"))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.parked"))
	end)
end)
