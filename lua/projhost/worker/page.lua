-- The unpartitioned plan: one state and checkpoint for the projection,
-- events read in (transaction_id, global_position) order below the xmin
-- horizon (design §2), a page a batch, the next page read ahead while
-- this one is handled; the batch size that follows the state's size.
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
local pipe_begin, pipe_end, take_ahead = ctxm.pipe_begin, ctxm.pipe_end, ctxm.take_ahead
local to_event = events_m.to_event
local serial, settle = failure.serial, failure.settle
local transact, state_tag, same_events = transact_m.transact, transact_m.state_tag, transact_m.same_events
local BATCH, ASYNC_CATCHUP = transact_m.BATCH, transact_m.ASYNC_CATCHUP
local prepare, promote, report, run_caught_up =
	lifecycle.prepare, lifecycle.promote, lifecycle.report, lifecycle.run_caught_up
local json = P.json
local of = S.of
local pipe, caught, planner_session = S.pipe, S.caught, S.planner_session

local M = {}

-- A projection with a large state writes all of it with every batch, so
-- its batches grow with the state: one event per STATE_BYTES_PER_EVENT
-- bytes of (JSON) state, up to BATCH_GROWTH x BATCH. Measured with a
-- 215 KB state: 1,000-event batches spent most of their time encoding,
-- sending and storing the state (make bench, read model rows).
local STATE_BYTES_PER_EVENT = 16
local BATCH_GROWTH = 16
-- ...but a page (two are in memory while reading ahead) stays below this
-- many bytes of event data, however large the state
local PAGE_BYTES = 16 * 1024 * 1024

-- The page read ahead by the batch that just ended, if it came back full
-- (a short one could miss events that became readable since).
local function ahead_page()
	local a = pipe.ahead_page
	pipe.ahead_page = nil
	if a and a.page and a.page:count() == pipe.ahead_size then return a end
	return nil
end

-- How many events the next batch of an unpartitioned projection reads,
-- after a state of state_len bytes, with events of event_len bytes on
-- average (see STATE_BYTES_PER_EVENT and PAGE_BYTES).
local function batch_for(state_len, event_len)
	local n = math.ceil(state_len / STATE_BYTES_PER_EVENT / BATCH) * BATCH
	n = math.min(n, math.floor(PAGE_BYTES / math.max(event_len, 1) / BATCH) * BATCH)
	return math.max(BATCH, math.min(BATCH * BATCH_GROWTH, n))
end

-- Open a job over the next page. plan (on the failure path): read
-- exactly its events, from its start, without reading ahead.
local function open_page(def, job, plan)
	local rt = of(def)
	local conn = S.conn
	-- (a plan's timers are read by id, not counted in its page)
	local plan_ids = timers.plan_ids(plan)
	local limit = plan and #plan.events - #plan_ids
	pipe_begin()
	if not pipe.on then return "dberror", dberror(def, "cannot enter pipeline mode") end
	local rp, hp = rt.read_params, rt.held_params
	local want = limit or rt.batch or BATCH
	-- The read goes out with the checkpoint this worker committed last
	-- (a guess checked against the locked row below): one round trip in
	-- the common case, with a plan made for the real values.
	-- The state too: it is what this worker committed with that
	-- checkpoint, so a hit saves fetching and decoding it (a large state
	-- is most of a batch's cost). Taken out now, put back after COMMIT:
	-- handlers mutate it, and a failed batch must not leave it dirty.
	local guess = rt.last
	rt.last = nil
	if plan then guess = nil end
	conn:send("BEGIN")
	-- xmin tells whether anyone (a parked retry, another instance, an
	-- operator) wrote the row since our last commit
	conn:send_query([[SELECT version, CASE WHEN $2 THEN state::text END AS state, last_tx::text AS last_tx,
		last_pos, status, xmin::text AS rx, xid(pg_current_xact_id())::text AS my_xid
		FROM projhost.checkpoints WHERE projection = $1 AND partition = ''
		FOR UPDATE SKIP LOCKED]], rt.cp, guess == nil)
	-- the reads below run with the alternatives to their index ranges
	-- priced out; set back before any handler's SQL (see projhost.reads)
	conn:send(reads.PLANNER_SQL)
	-- a full page read ahead by the previous batch (see below) is this
	-- batch's page, if the checkpoint is still where that batch left it
	local ahead = guess and guess.ahead
	if ahead then
		want = ahead.page:count()
		conn:send("SELECT 1")
	elseif guess then
		conn:send_events(rt.read_sql, guess.tx, guess.pos, want, unpack(rp, 1, #rp))
	else
		conn:send("SELECT 1")
	end
	conn:send_query(rt.held_sql, unpack(hp, 1, #hp))
	-- the due timers (after the lock, so under it)
	timers.send_read(def, { "" }, plan_ids)
	local ok, res, code = conn:sync(true)
	if not ok then
		pipe.on = false
		if conn:ok() then conn:pipeline(false) end
		return "dberror", dberror(def, res, code)
	end
	local row, rows, held = res[2][1], res[4], #res[5] > 0
	local due, truncated = timers.take_read(res[6])
	local hit = row and guess and guess.rx == row.rx and guess.tx == row.last_tx
		and guess.pos == tonumber(row.last_pos)
	if row and plan and (row.last_tx ~= plan.start[""].tx or tonumber(row.last_pos) ~= plan.start[""].pos) then
		-- moved by another worker or instance since the plan was read
		pipe_end()
		rollback()
		return "more", 0
	end
	if row and not hit then
		want, ahead = limit or rt.batch or BATCH, nil
		-- another worker or instance moved it, or our first batch
		local err2
		rows, err2, code = conn:events(rt.read_sql, row.last_tx, tonumber(row.last_pos), want,
			unpack(rp, 1, #rp))
		local srows = rows and guess and conn:query([[SELECT state::text AS state FROM projhost.checkpoints
			WHERE projection = $1 AND partition = '']], rt.cp)
		if srows then row.state = srows[1] and srows[1].state end
		if not rows or (guess and not srows) then
			pipe_end()
			return "dberror", dberror(def, err2 or "reading the state failed", code)
		end
	end
	if not row or row.status ~= "running" or tonumber(row.version) ~= def.version then
		pipe_end()
		rollback()
		rt.ok_at = nil -- look properly next time (row gone, paused, new version)
		if not row then
			S.setup_done[rt.cp] = nil
			return "locked", 0
		end
		if row.status ~= "running" then return row.status, 0 end
		return "more", 0
	end

	local state
	if hit then
		state = guess.state
	else
		state = row.state and json.decode(row.state)
	end

	-- from here on every statement is tagged (see ctx.lua): ours are false
	if not limit and not serial(def) and (ahead or #rows == want) then
		-- Read the next page now, inside this transaction, so the server
		-- reads it while this page is handled here (make bench: worker
		-- and server took turns before). Below the horizon nothing
		-- changes, so the page is what the next batch would read - if the
		-- checkpoint is still ours then (checked with its xmin as above).
		-- See take_ahead for when its events are made.
		local tx, pos
		if ahead then
			tx, pos = ahead.page:last()
		else
			local e = to_event(rows[#rows])
			tx, pos = e.tx, e.position
		end
		local size = rt.batch or BATCH
		-- its number: the page is found by position among the results
		local idx = conn:send_page_as(false, rt.read_sql, tx, pos, size, unpack(rp, 1, #rp))
		if idx then
			pipe.ahead, pipe.ahead_size = idx, size
			-- a full page: more events are waiting, this batch is in the
			-- middle of a catch-up (see ASYNC_CATCHUP)
			if ASYNC_CATCHUP and conn:send_as(false, "SET LOCAL synchronous_commit = off") then
				pipe.async = true
			end
			conn:flush()
		end
	end
	conn:send_as(false, reads.RESTORE_SQL, unpack(planner_session))
	if ahead then rows = ahead.events or ahead.page:events() end

	local events = rows
	for i = 1, #events do
		local e = to_event(events[i])
		e.index, e.partition = i, ""
	end
	local groups = { { part = "", state = state, i0 = 1, i1 = #events,
		status = (limit or #events < want) and "idle" or "more" } }
	local n_events, fired
	events, n_events, job.last_event, fired = timers.merge(events, groups, due, plan ~= nil)
	if plan and not same_events(plan, events) then return "more", 0 end
	timers.send_fire(def, events, fired)
	job.fired, job.n_events, job.timers_more = #fired, n_events, truncated
	job.events, job.row, job.want, job.held, job.limit = events, row, want, held, limit
	job.groups = groups
	job.start = { [""] = { tx = row.last_tx, pos = tonumber(row.last_pos) } }
	return true
end

local function store_page(job, states)
	local def, last = job.def, job.last_event
	if not last then
		-- only timers fired: the state changed, the checkpoint did not
		if (job.fired or 0) > 0 then
			S.conn:send_as(state_tag(job), [[UPDATE projhost.checkpoints SET state = $2::jsonb,
				script_hash = $3, error = NULL, updated_at = now() WHERE projection = $1 AND partition = '']],
				of(def).cp, states[1], def.hash)
		end
		return
	end
	local page = last._page
	of(def).batch = batch_for(#states[1], page and page:bytes() / page:count() or 0)
	S.conn:send_as(state_tag(job), [[UPDATE projhost.checkpoints SET state = $2::jsonb, last_tx = $3::xid8,
		last_pos = $4, script_hash = $5, error = NULL, updated_at = now()
		WHERE projection = $1 AND partition = '']],
		of(def).cp, states[1], last.tx, last.position, def.hash)
end

-- one transaction over exactly plan's events (the failure path)
local function attempt_page(def)
	return function(plan)
		local job = { def = def, store = store_page, after_commit = take_ahead }
		local st, d = open_page(def, job, plan)
		if st ~= true then return { status = st, delay = d } end
		return transact(def, job)
	end
end

-- Returns status, count, delay (statuses: see core/master.c).
-- Two round trips: [BEGIN, lock the checkpoint row, read, held-back check],
-- then [the handlers' statements, checkpoint, COMMIT].
local function run_batch(def)
	local rt = of(def)
	S.running = def
	-- the full check (setup, version, status, shadows, parked retries) at
	-- most once a second; the locked row is checked on every batch anyway
	local now = core.monotime()
	if rt.shadow_of or not rt.ok_at or now - rt.ok_at > 1 then
		local ready, why = prepare(def)
		if ready ~= true then return ready, 0, why end
		rt.ok_at = now
	elseif not ensure_conn() then
		return "dberror", 0, backoff()
	end

	local job = { def = def, store = store_page, after_commit = take_ahead }
	local st, d = open_page(def, job)
	if st ~= true then return st, 0, d end
	local o = transact(def, job)
	-- (the page's events: the job's are them and its timers, see timers.merge)
	local events, n = job.events, job.n_events
	if o then
		rt.last = nil
		if o.status == "dberror" then return "dberror", 0, dberror(def, first_line(o.err), o.code) end
		local plan = { kind = "page", events = events, start = job.start }
		local status, delay, committed = settle(def, plan, o, attempt_page(def))
		if status == "dberror" then delay = dberror(def, "the batch's database work failed") end
		report(def, committed, nil, false)
		timers.after_commit(def)
		return status, committed, delay
	end
	S.db_failures = 0
	timers.after_commit(def)
	local row = job.row
	local last = job.last_event
	local last_pos = last and last.position or tonumber(row.last_pos)
	rt.last = { tx = last and last.tx or row.last_tx, pos = last_pos, state = job.groups[1].out,
		rx = (last or job.fired > 0) and row.my_xid or row.rx, ahead = ahead_page() }
	local status, key = "more", rt.cp .. "\t"
	if n < job.want and not job.timers_more then status = job.held and "held" or "idle" end
	if n == job.want then caught[key] = nil end
	report(def, n, { position = last_pos }, status == "idle" and not caught[key])
	if status == "idle" and not caught[key] then
		caught[key] = true
		log("info", rt.cp, "caught up", { position = last_pos })
		run_caught_up(def)
		-- what the hook wrote is not ours to guess
		rt.last = nil
	end
	if status == "idle" and rt.shadow_of then
		local okp, err, pcode = promote(def)
		if not okp then return "dberror", n, dberror(def, err, pcode) end
		return "idle", n, 0
	end
	return status, n, 0
end
M.run_batch = run_batch

return M
