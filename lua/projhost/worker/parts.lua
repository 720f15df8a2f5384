-- The partitioned plan: one state and checkpoint (stream_version) per
-- stream, many partitions a transaction (a job of up to 1,024), a new
-- partition's row made by the batch that commits its first events; and
-- the ANALYZE rule for the checkpoints table this plan fills.
local core = require "projhost.core"
local P = require "projhost.projection"
local reads = require "projhost.reads"
local S = require "projhost.worker.state"
local session = require "projhost.worker.session"
local events_m = require "projhost.worker.events"
local ctxm = require "projhost.worker.ctx"
local failure = require "projhost.worker.failure"
local transact_m = require "projhost.worker.transact"
local lifecycle = require "projhost.worker.lifecycle"
local timers = require "projhost.worker.timers"

local log, first_line = session.log, session.first_line
local rollback, ensure_conn, backoff, dberror =
	session.rollback, session.ensure_conn, session.backoff, session.dberror
local pipe_begin, pipe_end = ctxm.pipe_begin, ctxm.pipe_end
local to_event, visible, stream_in_source = events_m.to_event, events_m.visible, events_m.stream_in_source
local settle = failure.settle
local transact, state_tag, same_events = transact_m.transact, transact_m.state_tag, transact_m.same_events
local BATCH, ASYNC_CATCHUP = transact_m.BATCH, transact_m.ASYNC_CATCHUP
local prepare, report = lifecycle.prepare, lifecycle.report
local pg_text_array = reads.pg_text_array
local json = P.json
local of = S.of
local pipe, planner_session = S.pipe, S.planner_session

local M = {}

-- A job of partitions reads at most this many events, whatever its size:
-- each of its partitions up to BATCH, fewer when it has more than
-- JOB_EVENTS / BATCH of them, one at least (so a job of PH_GROUP, 1,024,
-- partitions stays within it for a BATCH of 8 or more). The master groups
-- that many so that a catch-up of many small streams pays a job's fixed
-- costs once per 1,024 partitions; a long stream in a large job goes on
-- in the next.
local JOB_EVENTS = 128 * BATCH

-- Checkpoint rows this worker created. A new partitioned projection over
-- many streams grows projhost.checkpoints from nothing to a row per stream
-- in minutes, faster than autovacuum analyzes it, and with the statistics
-- of an empty table the planner scans the whole table for every job (make
-- bench: 1 worker 10x slower on a fresh database). So the worker analyzes
-- it itself each time its count doubles: a dozen times for a million.
-- (S.new_checkpoints counts them; the next ANALYZE comes at S.analyze_at)

-- A job's partitions as reads.PARTS_SQL finds them: the rows it locked
-- (FOR UPDATE SKIP LOCKED: mine), the rows it could not lock (another
-- worker or instance holds them: "locked", looked at again soon, their
-- events not even read), and the others have no row: a partition nothing
-- was ever committed for, read from its start. Such a partition gets its
-- row only from the batch that commits its first events (store_parts),
-- with one plain INSERT: no row made, locked and written again in the same
-- transaction (1,000,000 streams x 2 events: that was half the time of a
-- job, three WAL records a row and no HOT update, as the inserts fill
-- their pages). Two workers or instances that both take a partition for
-- new cannot both commit it: the second INSERT waits for the first
-- transaction and then fails on the primary key (23505), which rolls the
-- second batch back whole; it runs again from the row the first committed.
-- The groups of a job (transact.lua): for each partition of `locked`
-- ({ partition, last_pos, state, new }, in the job's order) its rows of
-- by_part (in version order, up to `per`) from the version after its
-- checkpoint, up to a gap (held: versions commit in order, so a missing
-- one is still in flight) or to stop_at[p] (a plan). -> events, groups; a
-- partition with nothing to apply gets its status in results instead.
local function groups_of(def, locked, by_part, per, stop_at, results, due, truncated)
	due = due or {}
	local events, groups = {}, {}
	for _, cp in ipairs(locked) do
		local p = cp.partition
		local last = tonumber(cp.last_pos)
		local g = { part = p, start = last, i0 = #events + 1, status = "idle", new = cp.new }
		g.status = #(by_part[p] or {}) >= per and "more" or "idle"
		local stop = stop_at and (stop_at[p] or last + 1)
		for _, r in ipairs(by_part[p] or {}) do
			local e = to_event(r)
			if e.version ~= last + 1 then
				-- versions commit in order, so a gap is one still in flight
				g.status = "held"
				break
			end
			if stop and e.version >= stop then
				g.status = "more"
				break
			end
			if visible(def, e.type) and not rawget(e, "_own") then
				events[#events + 1] = e
				e.index, e.partition = #events, p
			end
			last = e.version
		end
		g.i1, g.last = #events, last
		-- due timers (worker/timers.lua): a partition with timers and no
		-- new event is a group too, its state came with them
		local ts = due[p]
		if ts and truncated and g.status == "idle" then g.status = "more" end
		if last > g.start or g.i1 >= g.i0 or ts then
			local st = cp.state or (ts and ts.state)
			g.state = st and json.decode(st)
			groups[#groups + 1] = g
		else
			results[p] = { g.status, 0 }
		end
	end
	return events, groups
end
M.groups_of = groups_of

-- Open a job over partitions `wanted` (sorted). plan (the failure path):
-- exactly its events, each partition from its start and up to (not
-- including) its first event that is not in the plan.
local function open_parts(def, job, wanted, plan)
	local rt = of(def)
	local conn = S.conn
	local stop_at
	if plan then
		stop_at = {}
		-- (a timer of the plan moves no checkpoint: see timers.lua)
		for _, e in ipairs(plan.events) do
			if not rawget(e, "timer") then stop_at[e.partition] = e.version + 1 end
		end
		local nx = plan.next
		if nx and not rawget(nx, "timer") then stop_at[nx.partition] = nx.version end
	end
	-- One round trip, one statement for the partitions: open, lock their
	-- rows and read each stream past its checkpoint (see reads.PARTS_SQL;
	-- a row made meanwhile by someone else gives events that do not follow
	-- on from 0: see "held" below). It runs with the alternatives to its
	-- index ranges priced out, and only it: under these settings a query
	-- over `partition = ANY(...)` with an ORDER BY became a walk of every
	-- checkpoint of the projection; set back before any handler's SQL
	pipe_begin()
	if not pipe.on then return "dberror", dberror(def, "cannot enter pipeline mode") end
	conn:send("BEGIN")
	-- shared: a version reset (exclusive) waits for batches in flight
	conn:send("SELECT pg_advisory_xact_lock_shared(hashtext('projhost:' || $1))", rt.cp)
	conn:send(reads.PLANNER_SQL)
	local per = math.max(1, math.min(BATCH, math.floor(JOB_EVENTS / #wanted)))
	conn:send_events(reads.PARTS_SQL, rt.cp, pg_text_array(wanted), per, not def.own_events, def.name)
	-- their due timers (only the plan's, on the failure path)
	timers.send_read(def, wanted, timers.plan_ids(plan))
	local ok, res, code = conn:sync(true)
	if not ok then
		pipe.on = false
		if conn:ok() then conn:pipeline(false) end
		return "dberror", dberror(def, res, code)
	end
	local evrows = res[4]
	local due, truncated = timers.take_read(res[5])
	-- from here on every statement is tagged (see ctx.lua): ours are false
	conn:send_as(false, reads.RESTORE_SQL, unpack(planner_session))

	-- each partition's rows come in version order (reads.PARTS_SQL); a
	-- plan that ever did otherwise is sorted here, not taken for a gap.
	-- found[p]: its checkpoint, as the statement found it
	local by_part, found, unordered = {}, {}, false
	for _, r in ipairs(evrows) do
		local p = rawget(r, "partition")
		local f = found[p]
		if not f then
			f = { partition = p }
			found[p] = f
			local pos = rawget(r, "_pos")
			if pos then f.last_pos = pos else f.new = not rawget(r, "_held") end
			f.held, f.status = rawget(r, "_held"), rawget(r, "_status")
		end
		local st = rawget(r, "_state")
		-- ours, not the handlers'
		if st then f.state = st; rawset(r, "_state", nil) end
		if rawget(r, "_pos") then rawset(r, "_pos", nil) end
		if r.version then
			local l = by_part[p]
			if not l then l = {}; by_part[p] = l end
			if #l > 0 and l[#l].version >= r.version then unordered = true end
			l[#l + 1] = r
		end
	end
	if unordered then
		for _, l in pairs(by_part) do
			table.sort(l, function(a, b) return a.version < b.version end)
		end
	end
	-- locked: the partitions of the job, mine or new (r.new), in order
	local results = job.results
	local locked = {}
	for _, p in ipairs(wanted) do
		local r = found[p]
		if not r then
			-- not in the statement's answer (never so; as if held)
			results[p] = { "locked", 0 }
		elseif r.held then
			results[p] = { "locked", 0 }
		elseif r.status then
			-- paused, failed, stopped, done, held: nothing was read
			results[p] = { failure.reported(r.status), 0 }
		elseif r.new then
			r.last_pos = 0
			locked[#locked + 1] = r
		else
			locked[#locked + 1] = r
		end
	end
	if plan then
		-- every partition of the plan locked by us (or still new), where
		-- the plan starts
		local have = {}
		for _, r in ipairs(locked) do have[r.partition] = tonumber(r.last_pos) end
		for _, e in ipairs(plan.events) do
			if have[e.partition] ~= plan.start[e.partition].pos then
				pipe_end()
				rollback()
				return "more", 0
			end
		end
	end
	if #locked == 0 then
		pipe_end()
		rollback()
		return "empty", 0
	end

	local events, groups = groups_of(def, locked, by_part, per, stop_at, results, due, truncated)
	local fired
	events, job.n_events, job.last_event, fired = timers.merge(events, groups, due, plan ~= nil)
	if plan and not same_events(plan, events) then return "more", 0 end
	timers.send_fire(def, events, fired)
	job.fired = #fired
	job.events, job.groups = events, groups
	job.start = {}
	for _, cp in ipairs(locked) do job.start[cp.partition] = { pos = tonumber(cp.last_pos) } end
	if ASYNC_CATCHUP and not plan and #groups > 1 then
		-- More partitions were due at once than one: a catch-up (or a
		-- burst), whose commits need not wait for their WAL flush (see
		-- ASYNC_CATCHUP; 1,000,000 streams: a flush per job of 128 was a
		-- third of its time). A job of one partition - nearly every live
		-- batch - waits, and so does one that emits; the catch-up's end
		-- waits for all of them (see caught_up_partitioned).
		if conn:send_as(false, "SET LOCAL synchronous_commit = off") then pipe.async = true end
	end
	return true
end

-- The partitions a handler finished in this batch (ctx:done): stream ->
-- the version of the event that finished it. Their checkpoint stops at
-- that event (the events after it are not applied: projhost.projection's
-- apply) and its status becomes 'done', in the batch's transaction.
local function done_of(job)
	local ctx = of(job.def).ctx
	return ctx and ctx._done
end

local function store_parts(job, states, g0, g1)
	local conn = S.conn
	local up_p, up_s, up_v = {}, {}, {}
	local in_p, in_s, in_v = {}, {}, {}
	local done = done_of(job)
	local done_p, done_v = {}, {}
	local groups = job.groups
	for i = g0, g1 do
		local g = groups[i]
		local dv = done and done[g.part]
		if dv then
			g.last, g.status = dv, "done"
			done_p[#done_p + 1], done_v[#done_v + 1] = g.part, dv
		end
		if g.new then
			in_p[#in_p + 1], in_s[#in_s + 1], in_v[#in_v + 1] = g.part, states[i], g.last
		else
			up_p[#up_p + 1], up_s[#up_s + 1], up_v[#up_v + 1] = g.part, states[i], g.last
		end
	end
	job.inserted = (job.inserted or 0) + #in_p
	-- the checkpoints and COMMIT ride the same sync as the handlers'
	-- statements; after an error PostgreSQL skips them
	if #up_p > 0 then
		conn:send_as(state_tag(job), [[UPDATE projhost.checkpoints c SET state = coalesce(u.s::jsonb, c.state),
			last_pos = u.v, script_hash = $5, error = NULL, updated_at = now()
			FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(p, s, v)
			WHERE c.projection = $1 AND c.partition = u.p]],
			of(job.def).cp, pg_text_array(up_p), pg_text_array(up_s), "{" .. table.concat(up_v, ",") .. "}",
			job.def.hash)
	end
	if #in_p > 0 then
		-- new partitions (see open_parts): no ON CONFLICT, a row made
		-- meanwhile must fail this batch
		local tag = state_tag(job)
		tag.claim = true
		conn:send_as(tag, [[INSERT INTO projhost.checkpoints (projection, partition, version, state,
			last_pos, script_hash)
			SELECT $1, u.p, $2, u.s::jsonb, u.v, $6 FROM unnest($3::text[], $4::text[], $5::bigint[]) AS u(p, s, v)
			ORDER BY u.p]],
			of(job.def).cp, job.def.version, pg_text_array(in_p), pg_text_array(in_s),
			"{" .. table.concat(in_v, ",") .. "}", job.def.hash)
	end
	if #done_p > 0 then
		-- seldom: a second write of those rows, after the first (status
		-- is in checkpoints_status_idx's predicate: no HOT update anyway)
		conn:send_as(state_tag(job), [[UPDATE projhost.checkpoints c SET status = 'done', last_pos = u.v,
			error = NULL, updated_at = now()
			FROM unnest($2::text[], $3::bigint[]) AS u(p, v)
			WHERE c.projection = $1 AND c.partition = u.p]],
			of(job.def).cp, pg_text_array(done_p), "{" .. table.concat(done_v, ",") .. "}")
		timers.send_drop_parts(job.def, done_p)
	end
end

local function attempt_parts(def)
	return function(plan)
		local wanted, seen = {}, {}
		local function add(p) if p and not seen[p] then seen[p] = true; wanted[#wanted + 1] = p end end
		for _, e in ipairs(plan.events) do add(e.partition) end
		if plan.next then add(plan.next.partition) end
		table.sort(wanted)
		if #wanted == 0 then return nil end
		local job = { def = def, store = store_parts, results = {} }
		local st, d = open_parts(def, job, wanted, plan)
		if st ~= true then return { status = st == "empty" and "more" or st, delay = d } end
		local o = transact(def, job)
		if not o then S.new_checkpoints = S.new_checkpoints + (job.inserted or 0) end
		return o
	end
end

-- After a commit that made n checkpoint rows (see "Checkpoint rows this
-- worker created" above).
local function inserted(def, n)
	S.new_checkpoints = S.new_checkpoints + (n or 0)
	if S.new_checkpoints >= S.analyze_at then
		S.analyze_at = S.analyze_at * 2
		-- the planner needs the table's size, not fine statistics: a
		-- small sample (3,000 rows) takes 10 ms at 100,000 rows, not 100
		S.conn:exec("SET default_statistics_target = 10")
		local okA, errA = S.conn:exec("ANALYZE projhost.checkpoints")
		S.conn:exec("RESET default_statistics_target")
		if not okA then log("warn", of(def).cp, "ANALYZE projhost.checkpoints: " .. tostring(errA)) end
	end
end
M.inserted = inserted

-- Returns count, results { [part] = { status, delay } }.
local function run_partitions(def, parts)
	local rt = of(def)
	S.running = def
	local results = {}
	local function all(status, delay)
		for _, p in ipairs(parts) do results[p] = { status, delay or 0 } end
		return 0, results
	end
	local now = core.monotime()
	if rt.shadow_of or not rt.ok_at or now - rt.ok_at > 1 then
		local ready, why = prepare(def)
		if ready ~= true then return all(ready, why) end
		if why == "reset" then
			-- every partition starts over; ask the master to rediscover
			results[""] = { "more", 0 }
		end
		rt.ok_at = now
	elseif not ensure_conn() then
		return all("dberror", backoff())
	end

	local wanted = {}
	for _, p in ipairs(parts) do
		if stream_in_source(def, p) then wanted[#wanted + 1] = p else results[p] = { "idle", 0 } end
	end
	if #wanted == 0 then return 0, results end
	table.sort(wanted) -- one order for every worker: inserts below cannot deadlock

	local job = { def = def, store = store_parts, results = results }
	local st, d = open_parts(def, job, wanted)
	if st == "empty" then return 0, results end
	if st ~= true then
		for _, p in ipairs(wanted) do if not results[p] then results[p] = { st, d } end end
		return 0, results
	end
	local o = transact(def, job)
	if o then
		local status, delay, committed, culprit
		if o.status == "dberror" then
			status, delay, committed = "dberror", dberror(def, first_line(o.err), o.code), 0
		else
			local plan = { kind = "parts", events = job.events, start = job.start }
			status, delay, committed, culprit = settle(def, plan, o, attempt_parts(def))
			if status == "dberror" then delay = dberror(def, "the batch's database work failed") end
		end
		-- the partitions of the job run again (the next job starts where
		-- each one's checkpoint is now), the failing one gets its action
		for _, g in ipairs(job.groups) do
			results[g.part] = { status == "dberror" and "dberror" or "more", status == "dberror" and delay or 0 }
		end
		if culprit then results[culprit.partition] = { status, delay } end
		report(def, committed, nil, false)
		timers.after_commit(def)
		return committed, results
	end
	local total = 0
	for _, g in ipairs(job.groups) do
		results[g.part] = { g.status, 0 }
		total = total + (g.last - g.start)
	end

	S.db_failures = 0
	report(def, total, nil, false)
	timers.after_commit(def)
	inserted(def, job.inserted)
	return total, results
end
M.run_partitions, M.store_parts, M.JOB_EVENTS = run_partitions, store_parts, JOB_EVENTS

return M
