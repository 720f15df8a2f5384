-- Lag that is true (issue 13): events behind counted from the tables,
-- exact, and only of a projection's own source; seconds behind, rates,
-- stalled; `projhost status [NAME]`, projhost.projection_status,
-- projhost.status_json and projhost.partition_status on a real PostgreSQL.
local h = require "helpers"
local cjson = require "projhost.json"
local core = require "projhost.core"
local scalar = h.scalar

-- partitioned over category lacct: a row per applied event (read model)
local LP = [[
return {
	name = "lp",
	from = { category = "lacct" },
	partition = "stream",
	setup = "CREATE TABLE IF NOT EXISTS lp_seen (stream text, version bigint, PRIMARY KEY (stream, version))",
	when = { ["*"] = function(s, e, ctx) ctx:exec("INSERT INTO lp_seen VALUES ($1, $2)", e.stream, e.version) end },
}
]]

-- unpartitioned over the same category, Inc events only
local LU = [[
return {
	name = "lu",
	from = { category = "lacct", types = { "Inc" } },
	init = function() return { n = 0 } end,
	when = { Inc = function(s) s.n = s.n + 1 end },
}
]]

-- another projection's events (category lnoise): never anyone else's lag
local LN = [[
return {
	name = "ln",
	from = { category = "lnoise" },
	init = function() return { n = 0 } end,
	when = { ["*"] = function(s) s.n = s.n + 1 end },
}
]]

local function status_json(conn, name, stall_after)
	local doc = cjson.decode(scalar(conn, "SELECT projhost.status_json($1, $2)::text", name, stall_after or 60))
	local by = {}
	for _, p in ipairs(doc.projections) do by[p.name] = p end
	return by, doc
end

-- the truth, from the tables
local function truth_partitioned(conn, name, category)
	return tonumber(scalar(conn, [[SELECT coalesce(sum(s.version - coalesce(c.last_pos, 0)), 0)
		FROM projhost.streams s LEFT JOIN projhost.checkpoints c ON c.projection = $1 AND c.partition = s.stream_id
		WHERE split_part(s.stream_id, '-', 1) = $2]], name, category))
end

local function truth_unpartitioned(conn, name, category, etype)
	return tonumber(scalar(conn, [[SELECT count(*) FROM projhost.events e, projhost.checkpoints c
		WHERE c.projection = $1 AND c.partition = '' AND split_part(e.stream_id, '-', 1) = $2
			AND e.event_type = $3 AND (e.transaction_id, e.global_position) > (c.last_tx, c.last_pos)]],
		name, category, etype))
end

-- events of streams PREFIX0..PREFIX(n-1), versions v0..v0+per-1, with
-- their projhost.streams rows as append leaves them
local function add(conn, prefix, n, v0, per, etype)
	assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type)
		SELECT $1::text || i, v, $5::text FROM generate_series(0, $2::int - 1) i,
			generate_series($3::int, $3::int + $4::int - 1) v
		ORDER BY v, i]], prefix, n, v0, per, etype))
	assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
		SELECT stream_id, max(stream_version), max(global_position) FROM projhost.events GROUP BY 1
		ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, last_position = EXCLUDED.last_position]]))
end

describe("lag", function()
	local dsn, conn, dir, locker

	before_each(function()
		dsn = h.fresh_db("lag")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		h.write_file(dir .. "/lp.lua", LP)
		h.write_file(dir .. "/lu.lua", LU)
		h.write_file(dir .. "/ln.lua", LN)
	end)

	after_each(function()
		-- a lock left by a failed test would block the backend of the
		-- killed worker for ever (and hold the cluster's horizon)
		if locker then locker:close(); locker = nil end
		h.stop_all()
		if conn then conn:close() end
	end)

	it("is exact per projection, counting only its own source's events (partitioned and unpartitioned)", function()
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir }))) -- schema, sources
		h.insert_events(conn, "lacct", 300, 30) -- versions 1..10
		add(conn, "lacct-", 30, 11, 1, "Other")
		h.insert_events(conn, "lnoise", 490, 7)
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		local by = status_json(conn)
		for _, n in ipairs({ "lp", "lu", "ln" }) do
			assert.equal(0, by[n].events_behind, n)
			assert.is_false(by[n].behind_estimated, n)
			assert.equal(0, by[n].lag_seconds, n)
			assert.equal("running", by[n].status, n)
			assert.is_false(by[n].stalled, n)
		end
		-- the old figure was the top position minus the projection's own
		assert.equal(0, by.lp.behind)

		-- more events: to existing and new streams, of a type lu does not
		-- read, and in another projection's category
		core.sleep(1.1)
		local before = tonumber(scalar(conn, "SELECT extract(epoch FROM now())"))
		add(conn, "lacct-", 10, 12, 1, "Inc")
		add(conn, "lacct-new", 5, 1, 3, "Inc")
		add(conn, "lacct-", 4, 13, 1, "Other")
		add(conn, "lnoise-", 7, 71, 10, "N")
		local lp_truth = truth_partitioned(conn, "lp", "lacct")
		local lu_truth = truth_unpartitioned(conn, "lu", "lacct", "Inc")
		assert.equal(10 + 15 + 4, lp_truth)
		assert.equal(10 + 15, lu_truth)
		core.sleep(0.3)
		local doc
		by, doc = status_json(conn)
		assert.equal(lp_truth, by.lp.events_behind)
		assert.equal(lu_truth, by.lu.events_behind)
		assert.equal(70, by.ln.events_behind)
		for _, n in ipairs({ "lp", "lu", "ln" }) do
			assert.is_false(by[n].behind_estimated, n)
			-- the age of its oldest event not applied (this test's inserts)
			local age = tonumber(scalar(conn, "SELECT extract(epoch FROM now())")) - before
			assert.is_true(by[n].lag_seconds > 0.2 and by[n].lag_seconds <= age + 0.5, n .. " " .. by[n].lag_seconds)
			-- a projection that got events a moment ago has not stalled
			assert.is_false(by[n].stalled, n)
			assert.equal("running", by[n].status, n)
		end
		assert.equal(60, doc.stall_after)

		-- projection_status: the contract's columns, the same figures
		local rows = assert(conn:query([[SELECT projection, status, partitioned::text, partitions, failed, paused,
			stopped, events_behind, behind_estimated::text, lag_seconds, applied_1m, rate_1m, eta_seconds, parked,
			stalled::text, position, error, updated_at FROM projhost.projection_status() ORDER BY 1]]))
		assert.same({ "ln", "lp", "lu" }, { rows[1].projection, rows[2].projection, rows[3].projection })
		assert.equal(tostring(lp_truth), rows[2].events_behind)
		assert.equal("true", rows[2].partitioned)
		assert.equal("30", rows[2].partitions)
		assert.equal("false", rows[3].partitioned)
		assert.equal(tostring(lu_truth), rows[3].events_behind)
		rows = assert(conn:query("SELECT * FROM projhost.projection_status('lu', 5)"))
		assert.equal(1, #rows)

		-- per partition: stream version minus checkpoint version; the new
		-- streams have no row yet, their events count in events_behind
		rows = assert(conn:query([[SELECT partition, version, status, behind FROM projhost.partition_status
			WHERE projection = 'lp' AND behind > 0 ORDER BY partition]]))
		assert.equal(10, #rows)
		local sum = 0
		for _, r in ipairs(rows) do sum = sum + tonumber(r.behind) end
		assert.equal(lp_truth - 15, sum)
		assert.same({ partition = "lacct-0", version = "11", status = "running", behind = "2" }, rows[1])
		rows = assert(conn:query("SELECT partition, version, behind FROM projhost.partition_status WHERE projection = 'lu'"))
		assert.same({ { partition = "", version = scalar(conn, [[SELECT last_pos FROM projhost.checkpoints
			WHERE projection = 'lu']]), behind = tostring(lu_truth) } }, rows)

		-- the CLI shows the same
		code, out, err = h.run({ "status", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("PROJECTION%s+PARTITIONS%s+STATUS%s+POSITION%s+BEHIND%s+LAG%s+RATE%s+ETA", out)
		assert.matches("\nlp%s+30%s+running%s+%d+%s+" .. lp_truth .. "%s+[%d.]+s%s", out)
		assert.matches("\nlu%s+1%s+running%s+%d+%s+" .. lu_truth .. "%s", out)
		code, out, err = h.run({ "status", "--json", "--db", dsn })
		assert.equal(0, code, err)
		local cli = cjson.decode(out)
		assert.equal(lp_truth, cli.projections[2].events_behind)
		code, out, err = h.run({ "status", "lp", "--behind", "--limit", "3", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("PARTITION%s+VERSION%s+PROCESSED%s+STATUS%s+BEHIND%s+ERROR", out)
		assert.matches("\nlacct%-0%s+11%s+%d%d%d%d%-%d%d%-%d%dT[%d:]+Z%s+running%s+2\n", out)
		assert.matches("\n%(first 3 shown; %-%-limit N shows more%)\n$", out)
		local _, listed = out:gsub("\nlacct%-", "")
		assert.equal(3, listed)
		code, out, err = h.run({ "status", "lp", "--failed", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("\nno partition has failed\n$", out)
		assert(conn:exec([[UPDATE projhost.checkpoints SET status = 'failed', error = 'pos=9 boom'
			WHERE projection = 'lp' AND partition = 'lacct-7']]))
		code, out, err = h.run({ "status", "lp", "--failed", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("\nlacct%-7%s+%d+%s+%S+%s+failed%s+%d+%s+pos=9 boom\n$", out)
		assert.matches("\nlp%s+30%s+failed 1/30%s", out)

		-- caught up again: all back to 0
		assert(conn:exec("UPDATE projhost.checkpoints SET status = 'running', error = NULL WHERE projection = 'lp'"))
		code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		by = status_json(conn)
		for _, n in ipairs({ "lp", "lu", "ln" }) do
			assert.equal(0, by[n].events_behind, n)
			assert.equal(0, by[n].lag_seconds, n)
			assert.is_true(by[n].applied_1m > 0, n)
			assert.is_true(by[n].rate_1m > 0, n)
		end
		assert.equal(35, by.lp.partitions)
		code, out, err = h.run({ "status", "lp", "--behind", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("\nno partition is behind\n$", out)
		-- what the run applied in the last minute, from the workers' samples
		assert.equal(330 + 29, by.lp.applied_1m)
	end)

	-- `status NAME --behind` (projhost.partitions_behind): every case of
	-- a partition behind, among many caught up, found without a join of
	-- every stream with its checkpoint (no sequential scan of either table:
	-- the newest events, the checkpoints not running) - a case the quick
	-- look missed would end in that join (or in a wrong list)
	it("lists the partitions behind from where they can be: no checkpoint yet, failed, done, old and new", function()
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir }))) -- schema, sources
		-- 1,500 streams of 2 events, all applied: lacct-K's at positions
		-- K+1 and K+1501, so lacct-0..499 have none among the newest 1,000
		h.insert_events(conn, "lacct", 3000, 1500)
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		local function append(stream, n)
			local events = {}
			for i = 1, n do events[i] = '{"type": "Inc"}' end
			assert(conn:query("SELECT projhost.append($1, NULL, $2::jsonb)", stream, "[" .. table.concat(events, ",") .. "]"))
		end
		local function cp(partition, set)
			assert(conn:exec("UPDATE projhost.checkpoints SET " .. set .. " WHERE projection = 'lp' AND partition = $1",
				partition))
		end
		cp("lacct-17", "last_pos = 1") -- old: its last event is far back
		assert(conn:exec("DELETE FROM projhost.checkpoints WHERE projection = 'lp' AND partition = 'lacct-33'"))
		cp("lacct-40", "last_pos = 1, status = 'failed', error = 'pos=41 boom'")
		cp("lacct-8", "status = 'done'")
		append("lacct-8", 2) -- never behind: done
		append("lacct-5", 1)
		append("lacct-new", 3) -- no checkpoint row yet
		local want = { { "lacct-17", "1", "1", "running" }, { "lacct-33", "0", "2" }, { "lacct-40", "1", "1", "failed" },
			{ "lacct-5", "2", "1", "running" }, { "lacct-new", "0", "3" } }
		local function listed(rows)
			local t = {}
			for i, r in ipairs(rows) do t[i] = { r.partition, r.version, r.behind, r.status } end
			return t
		end
		local function seq_scans()
			return scalar(conn, [[SELECT coalesce(sum(seq_scan), 0) FROM pg_stat_xact_user_tables
				WHERE schemaname = 'projhost' AND relname IN ('streams', 'checkpoints')]])
		end
		local BEHIND = "SELECT partition, version, behind, status FROM projhost.partitions_behind('lp', $1)"
		-- the truth, from the tables
		local truth = assert(conn:query([[SELECT s.stream_id AS partition, coalesce(c.last_pos, 0) AS version,
				s.version - coalesce(c.last_pos, 0) AS behind, c.status
			FROM projhost.streams s LEFT JOIN projhost.checkpoints c ON c.projection = 'lp' AND c.partition = s.stream_id
			WHERE split_part(s.stream_id, '-', 1) = 'lacct' AND s.version > coalesce(c.last_pos, 0)
				AND c.status IS DISTINCT FROM 'done' ORDER BY 1]]))
		assert.same(want, listed(truth))

		-- as `status NAME --behind` asks: events behind counted once
		assert(conn:exec("BEGIN ISOLATION LEVEL REPEATABLE READ"))
		assert.equal(1 + 2 + 1 + 1 + 3, status_json(conn, "lp").lp.events_behind)
		local scans = seq_scans()
		assert.same(want, listed(assert(conn:query(BEHIND, nil))))
		assert.same({ want[1], want[2] }, listed(assert(conn:query(BEHIND, 2))))
		assert.same({}, listed(assert(conn:query(BEHIND, 0))))
		assert.equal(scans, seq_scans())
		-- its own write since: counted again, not taken from the note
		cp("lacct-99", "last_pos = 1")
		assert.same({ want[1], want[2], want[3], want[4], { "lacct-99", "1", "1", "running" }, want[5] },
			listed(assert(conn:query(BEHIND, nil))))
		assert(conn:exec("ROLLBACK"))
		-- another snapshot's note (READ COMMITTED): an append committed meanwhile
		assert(conn:exec("BEGIN"))
		status_json(conn, "lp")
		local other = h.connect(dsn)
		assert(other:query("SELECT projhost.append('lacct-77', NULL, '[{\"type\": \"Inc\"}]')"))
		other:close()
		assert.same({ want[1], want[2], want[3], want[4], { "lacct-77", "2", "1", "running" }, want[5] },
			listed(assert(conn:query(BEHIND, nil))))
		assert(conn:exec("ROLLBACK"))
		cp("lacct-77", "last_pos = 3")
		-- on its own (events behind counted here) and by the CLI
		assert.same(want, listed(assert(conn:query(BEHIND, nil))))
		code, out, err = h.run({ "status", "lp", "--behind", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("\nlacct%-17%s+1%s+%S+%s+running%s+1\nlacct%-33%s+0%s+new%s+2\n"
			.. "lacct%-40%s+1%s+%S+%s+failed%s+1%s+pos=41 boom\nlacct%-5%s+2%s+%S+%s+running%s+1\n"
			.. "lacct%-new%s+0%s+new%s+3\n$", out)
		code, out, err = h.run({ "status", "lp", "--behind", "--limit", "2", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("\nlacct%-17%s[^\n]+\nlacct%-33%s[^\n]+\n%(first 2 shown; %-%-limit N shows more%)\n$", out)
		code, out, err = h.run({ "status", "lp", "--behind", "--failed", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("\nPARTITION[^\n]+\nlacct%-40%s[^\n]+pos=41 boom\n$", out)
		-- an unpartitioned projection: its one row
		local lu = assert(conn:query("SELECT partition, behind FROM projhost.partitions_behind('lu')"))
		assert.same({ { partition = "", behind = "7" } }, lu)

		-- many behind (more than the newest events hold: a walk in key
		-- order to the limit), and a streams row past its events (written
		-- by hand: the events do not account for it, the join does)
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type)
			SELECT stream_id, version + 1, 'Inc' FROM projhost.streams WHERE stream_id LIKE 'lacct-%' ORDER BY 1]]))
		assert(conn:exec([[UPDATE projhost.streams s SET version = e.v, last_position = e.p
			FROM (SELECT stream_id, max(stream_version) AS v, max(global_position) AS p FROM projhost.events
				GROUP BY 1) e WHERE e.stream_id = s.stream_id]]))
		assert(conn:exec("UPDATE projhost.streams SET version = version + 1 WHERE stream_id = 'lacct-1000'"))
		truth = assert(conn:query([[SELECT s.stream_id AS partition, coalesce(c.last_pos, 0) AS version,
				s.version - coalesce(c.last_pos, 0) AS behind, c.status
			FROM projhost.streams s LEFT JOIN projhost.checkpoints c ON c.projection = 'lp' AND c.partition = s.stream_id
			WHERE split_part(s.stream_id, '-', 1) = 'lacct' AND s.version > coalesce(c.last_pos, 0)
				AND c.status IS DISTINCT FROM 'done' ORDER BY 1]]))
		assert.equal(1500 - 1 + 1, #truth) -- lacct-8 done, lacct-new
		for _, limit in ipairs({ 3, 50, 2000 }) do
			local t = {}
			for i = 1, math.min(limit, #truth) do t[i] = truth[i] end
			assert.same(listed(t), listed(assert(conn:query(BEHIND, limit))), limit)
		end
		assert.same(listed(truth), listed(assert(conn:query(BEHIND, nil))))

		-- a walk that guessed wrong (a share behind among the newest events
		-- that the streams in key order do not have): it stops after its
		-- pages and the join goes on after them
		assert(conn:exec([[INSERT INTO projhost.checkpoints (projection, partition, last_pos)
			SELECT 'lp', stream_id, 0 FROM projhost.streams WHERE stream_id LIKE 'lacct-%'
			ON CONFLICT (projection, partition) DO NOTHING]]))
		h.insert_events(conn, "lacct-m", 25000, 25000) -- lacct-m-0.., after lacct-9.. and before lacct-new
		assert(conn:exec([[INSERT INTO projhost.checkpoints (projection, partition, last_pos)
			SELECT 'lp', stream_id, 0 FROM projhost.streams WHERE stream_id LIKE 'lacct-m-%']]))
		assert(conn:exec([[UPDATE projhost.checkpoints c SET last_pos = st.version FROM projhost.streams st
			WHERE c.projection = 'lp' AND st.stream_id = c.partition]]))
		cp("lacct-17", "last_pos = 1")
		for i = 1, 5 do append("lacct-x" .. i, 1) end
		assert.same({ { "lacct-17", "1", "2", "running" }, { "lacct-x1", "0", "1" }, { "lacct-x2", "0", "1" } },
			listed(assert(conn:query(BEHIND, 3))))
		assert.matches("projhost.partitions_behind: the limit must be >= 0",
			select(2, conn:query("SELECT * FROM projhost.partitions_behind('lp', -1)")), 1, true)
	end)

	it("estimates past its cap and says so", function()
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		local cap = require("projhost.schema").BEHIND_CAP
		h.insert_events(conn, "lacct", cap + 5000, 100)
		local by = status_json(conn, "lu")
		assert.is_true(by.lu.behind_estimated)
		-- positions are dense here: the estimate is close
		assert.is_true(math.abs(by.lu.events_behind - (cap + 5000)) < 500, tostring(by.lu.events_behind))
		-- partitioned projections are exact at any size
		by = status_json(conn, "lp")
		assert.equal(cap + 5000, by.lp.events_behind)
		assert.is_false(by.lp.behind_estimated)
	end)

	it("is stalled while a lock on its read model blocks its batch, logged once, and recovers", function()
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		local host = h.spawn({ "run", "--workers", "2", "--db", dsn, dir },
			{ env = { PROJHOST_STALL_AFTER = "1", PROJHOST_POLL_INTERVAL = "0.2" } })
		h.insert_events(conn, "lacct", 10, 2)
		h.wait_until(function() return scalar(conn, "SELECT count(*) FROM lp_seen") == "10" end, 20, "lp to apply")
		locker = h.connect(dsn)
		assert(locker:exec("BEGIN"))
		assert(locker:exec("LOCK TABLE lp_seen IN ACCESS EXCLUSIVE MODE"))
		assert(conn:query("SELECT projhost.append('lacct-0', NULL, '[{\"type\": \"Inc\"}]')"))
		-- meanwhile another projection's events keep the other worker busy
		local by = h.wait_until(function()
			assert(conn:query("SELECT projhost.append('lnoise-1', NULL, '[{\"type\": \"N\"}]')"))
			local b = status_json(conn, nil, 1)
			return b.lp.stalled and b
		end, 20, "lp to be stalled")
		assert.equal("stalled", by.lp.status)
		assert.equal(1, by.lp.events_behind)
		-- (ln stalls too: the blocked batch's transaction holds the xmin
		-- horizon, which unpartitioned projections cannot read past)
		h.wait_until(function() return host:output():find("lp stalled: 1 events behind", 1, true) end, 20,
			"the stall to be logged")
		local code, out = h.run({ "status", "--db", dsn }, { env = { PROJHOST_STALL_AFTER = "1" } })
		assert.equal(0, code)
		assert.matches("\nlp%s+2%s+stalled%s", out)
		assert.matches("\nlp stalled: 1 events behind", out)
		core.sleep(6) -- more looks than one
		local _, times = host:output():gsub("lp stalled:", "")
		assert.equal(1, times)
		assert(locker:exec("ROLLBACK"))
		locker:close()
		locker = nil
		by = h.wait_until(function()
			local b = status_json(conn, nil, 1)
			return b.lp.events_behind == 0 and b
		end, 20, "lp to catch up")
		assert.equal("running", by.lp.status)
		assert.is_false(by.lp.stalled)
		host:kill(15)
		host:wait(15)
	end)
end)

describe("progress", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("progress")
		conn = h.connect(dsn)
		dir = h.tmpdir()
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	-- each event costs ms milliseconds on the server
	local function slow(version, ms)
		return ([[
return {
	name = "slow",
	version = %d,
	from = { category = "sl" },
	init = function() return { n = 0 } end,
	when = { ["*"] = function(s, e, ctx) s.n = s.n + 1; if %s > 0 then ctx:exec("SELECT pg_sleep(%s)") end end },
}
]]):format(version, ms, ms / 1000)
	end

	it("of a catch-up longer than a few seconds is logged every 5 s: applied, events/s, remaining, ETA", function()
		h.write_file(dir .. "/slow.lua", slow(1, 4))
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		h.insert_events(conn, "sl", 3500, 5)
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 50 } })
		assert.equal(0, code, out .. err)
		local log = out .. err
		local applied, rate, remaining, eta = log:match(
			"slow catching up: applied (%d+) in the last minute, (%d+) events/s, (%d+) remaining, ETA (%S+)")
		assert.is_string(applied, log)
		assert.is_true(tonumber(applied) > 0 and tonumber(rate) > 0)
		assert.is_true(tonumber(remaining) > 0 and tonumber(remaining) < 3500)
		assert.matches("^%d+[smh]", eta)
		-- the lines between two exact looks go on from the last one, marked
		local after = log:sub((log:find("slow catching up: applied %d")))
		local left = after:match("\n[^\n]*slow catching up: applied ~%d+ in the last minute, ~%d+ events/s, "
			.. "~(%d+) remaining, ETA ~%d+[smh]")
		assert.is_string(left, log)
		assert.is_true(tonumber(left) < tonumber(remaining), log)
	end)

	it("of a shadow rebuild shows in status: NAME@V rebuilding 45% ETA 2m10s", function()
		h.write_file(dir .. "/slow.lua", slow(1, 0))
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		h.insert_events(conn, "sl", 2500, 5)
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 50 } })
		h.write_file(dir .. "/slow.lua", slow(2, 4))
		local shown = h.wait_until(function()
			local _, out = h.run({ "status", "--db", dsn })
			return out:match("\n(slow@2 rebuilding %d+%% ETA %d+[smh]%S*)\n")
		end, 30, "the rebuild's progress in status")
		local pct = tonumber(shown:match("(%d+)%%"))
		assert.is_true(pct >= 0 and pct < 100, shown)
		local by = status_json(conn, "slow@2")
		assert.equal("rebuilding", by["slow@2"].status)
		assert.equal("slow", by["slow@2"].shadow_of)
		h.wait_until(function() return host:output():find("version 2 caught up in the shadow: switched over", 1, true) end,
			60, "the switch-over")
		by = status_json(conn)
		assert.is_nil(by["slow@2"])
		assert.equal("running", by.slow.status)
		assert.equal(0, by.slow.events_behind)
		assert.matches("slow@2 rebuilding: applied %d+ in the last minute", host:output())
	end)
end)
