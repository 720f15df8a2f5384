-- The batch transaction, written once for every kind of batch (the
-- unpartitioned and the partitioned plan, a parked retry): run the
-- handlers over the job's events (the hot loop), flush ctx:upsert rows,
-- store the states, COMMIT, and say what failed.
local core = require "projhost.core"
local config = require "projhost.config"
local P = require "projhost.projection"
local S = require "projhost.worker.state"
local session = require "projhost.worker.session"
local ctxm = require "projhost.worker.ctx"
local failure = require "projhost.worker.failure"
local timers = require "projhost.worker.timers"

local errtext, rollback, db_fault = session.errtext, session.rollback, session.db_fault
local STATEMENT_TIMEOUT, SESSION_SQL, SESSION_PARAMS =
	session.STATEMENT_TIMEOUT, session.SESSION_SQL, session.SESSION_PARAMS
local ctx_for, pipe_end, pipe_pending = ctxm.ctx_for, ctxm.pipe_end, ctxm.pipe_pending
local overrun_at, serial, NOT_HOOKS = failure.overrun_at, failure.serial, failure.NOT_HOOKS
local of = S.of
local pipe, overrun = S.pipe, S.overrun

local M = {}

-- events per batch (unpartitioned) and per partition (partitioned)
local BATCH = config.get("PROJHOST_BATCH_SIZE")
-- Batches in the middle of a catch-up (a full page: more events are
-- waiting) commit without waiting for their WAL flush (SET LOCAL
-- synchronous_commit = off): waiting made a catch-up ~25% slower (make
-- bench, state only). Nothing can be lost or applied twice by it: such a
-- batch's read-model writes, state and checkpoint are one transaction, so
-- a PostgreSQL crash can only undo all of them together and the events are
-- applied again. A batch whose page is not full (the one that catches up,
-- nearly every live batch) and a batch that emits events (others may act
-- on those) commit synchronously, and that flush covers the earlier
-- commits: once a projection is caught up, all of it is on disk.
-- PROJHOST_SYNCHRONOUS_COMMIT=on makes every batch wait.
local ASYNC_CATCHUP = not config.get("PROJHOST_SYNCHRONOUS_COMMIT")
M.BATCH, M.ASYNC_CATCHUP = BATCH, ASYNC_CATCHUP

-- The state as stored, or nil and why (naming the projection's file).
local function encode_state(def, state)
	local s, err = P.encode_state(state)
	if not s then return nil, def.file .. ": " .. err end
	return s
end

-- The initial state of a partition (or of the projection): init() runs
-- under the watchdog, charged to the event that needed it.
local function init_state(def, position)
	core.beat(position, "init")
	local state = P.init_state(def)
	core.beat(position)
	return state
end

-- The message handler of every protected call into projection code:
-- error values of any kind become text (safely), with a traceback.
local function traceback(err)
	if type(err) ~= "string" then err = errtext(err) end
	return debug.traceback(err, 2)
end

local function is_memory(err)
	local s = type(err) == "string" and err or ""
	return s:find("not enough memory", 1, true) ~= nil or s == "error in error handling"
end

-- events[i0..i1] in ONE protected call by the caller (a pcall per event
-- costs more than a counting handler itself); S.cur says which event was
-- running when an error escaped (the ctx backend reads it too). core.beat tells the master's watchdog
-- which event is running since when.
local function apply_range(def, state, events, ctx, i0, i1)
	local papply, beat = P.apply, core.beat
	local ahead, conn = pipe.ahead, S.conn
	for i = i0, i1 do
		local e = events[i]
		S.cur = i
		-- the page read ahead arrives meanwhile (see conn:consume)
		if ahead and i % 256 == 0 then conn:consume() end
		ctx.event = e
		S.failed_sql = nil
		beat(e.position)
		state = papply(def, state, e, ctx)
		if S.failed_sql then
			-- the handler caught a failed statement and went on, but the
			-- transaction is aborted: the event failed
			error("SQL error (caught by the handler): " .. S.failed_sql, 0)
		end
	end
	return state
end

-- Every group of the job: { state, i0, i1 } -> g.out, the state after it.
local function apply_groups(def, job, ctx, g0, g1)
	local events, groups = job.events, job.groups
	for gi = g0, g1 do
		local g = groups[gi]
		local state = g.state
		if g.i1 >= g.i0 then
			-- init for a new partition is charged to its first event
			S.cur = g.i0
			if state == nil then state = init_state(def, events[g.i0].position) end
			state = apply_range(def, state, events, ctx, g.i0, g.i1)
		end
		-- nil: a partition that had only events of other types and no
		-- state yet keeps none (see store_parts)
		g.out = state
	end
	core.beat()
	S.cur = 0
	ctx.event = nil
	return true
end

-- A job of many partitions stores their states a slice of this many groups
-- at a time, each as soon as its handlers are done, while the handlers of
-- the next slice run: the server writes those rows meanwhile (1,000,000
-- new streams x 1.3 events: the INSERT of 1,024 checkpoint rows took as
-- long as their handlers, and the worker waited for it). One transaction
-- still: the slices commit or roll back together.
local SLICE_GROUPS = 256

-- A job is one transaction over events of one projection, in the order
-- they are applied: job.events (each with .index), job.groups (one per
-- partition: { part, state, i0, i1, ... }; an unpartitioned projection
-- has one group, partition ""). Its kind supplies two functions:
--   open(job)  BEGIN, lock the checkpoint rows, read the events and the
--              states (in pipeline mode); returns true | status, delay
--   store(job, states, g0, g1) queue the states and checkpoints of groups
--              g0..g1 (states[i]: group i's; tag them with
--              STATE_TAG) - COMMIT follows
-- transact() runs the rest: apply, flush ctx:upsert rows, store, COMMIT,
-- and says what failed: nil (committed), or { lo, hi, err } - the first
-- failure lies in events lo..hi (lo == hi: that event) - or a status.
-- failure.settle() then finds the event that fails by itself after every event
-- before it committed, and error_action gives it its action.

local function outcome_of(job, fail_i, fail_err)
	-- the handlers' statements still queued run under the budget too: the
	-- watchdog charges an overrun to the first event that sent one
	local first_sent
	for _, tag in ipairs(pipe_pending() or {}) do
		if type(tag) == "number" and (not first_sent or tag < first_sent) then first_sent = tag end
	end
	local e = first_sent and job.events[first_sent]
	if e then core.beat(e.position, "sql") end
	local first = pipe_end()
	if e then core.beat() end
	if first then
		local tag, code = first.tag, first.code
		if db_fault(code) then return { status = "dberror", err = first.err, code = code } end
		if tag == false or tag == nil then return { status = "dberror", err = first.err, code = code } end
		if type(tag) == "number" then
			-- the handler raised on it (with its line), or its statement failed
			if fail_i == tag then return { lo = tag, hi = tag, err = fail_err } end
			return { lo = tag, hi = tag, err = "ctx:exec: " .. first.err }
		end
		if tag.claim and code == "23505" then
			-- a new partition's row was made meanwhile by another worker
			-- or instance (see open_parts): nothing of this batch commits;
			-- it runs again from that row
			return { status = "more" }
		end
		if tag.state then
			-- our own UPDATE of the states: a state PostgreSQL refuses
			-- (class 22: invalid UTF-8, \u0000) is the events' doing
			if code and code:match("^22") then
				return { lo = tag.lo, hi = tag.hi, err = job.def.file .. ": state cannot be stored: " .. first.err }
			end
			return { status = "dberror", err = first.err, code = code }
		end
		return { lo = tag.lo, hi = tag.hi, err = "ctx:upsert: " .. first.err }
	end
	if fail_i then return { lo = fail_i, hi = fail_i, err = fail_err } end
	if not S.conn:ok() then return { status = "dberror", err = "connection lost" } end
	return nil
end

-- The states of groups g0..g1 as stored (job.store's states[i] for group
-- i), then their store. -> nil | the job's outcome (a state that cannot be
-- encoded: the batch is rolled back).
local function store_groups(def, job, states, g0, g1)
	local conn = S.conn
	local groups = job.groups
	for i = g0, g1 do
		local g = groups[i]
		local sj, serr = false, nil
		if g.out ~= nil then sj, serr = encode_state(def, g.out) end
		if sj == nil then
			local o = outcome_of(job)
			rollback()
			return o or { lo = g.i0, hi = math.max(g.i0, g.i1), err = serr }
		end
		states[i] = sj
	end
	if pipe.handler_sql then
		-- a handler may have changed our statement timeout (SET LOCAL)
		conn:send_as(false, "SELECT set_config('statement_timeout', $1, true)", STATEMENT_TIMEOUT)
	end
	job.store(job, states, g0, g1)
	return nil
end

local function transact(def, job)
	local conn = S.conn
	local ctx = ctx_for(def)
	ctx._discard()
	S.failed_sql = nil
	local events, n = job.events, #job.events
	for i = 1, next(overrun[of(def).cp] or {}) and n or 0 do
		local o = overrun_at(def, events[i].position, NOT_HOOKS)
		if o then
			-- counted as a failure without running the code again
			pipe_end()
			rollback()
			return { lo = i, hi = i, err = ("%s: %s %s"):format(def.file, o.kind or "handler",
				tostring(o.reason)), overrun = events[i].position }
		end
	end
	local fail_i, fail_err
	local one_by_one = serial(def, events)
	if one_by_one and pipe.on then
		pipe_end()
		pipe.first = nil
	end
	-- slices (see SLICE_GROUPS) but the last are stored on the way
	local groups, states = job.groups, {}
	local slice = (pipe.on and not one_by_one) and SLICE_GROUPS or #groups
	local g0, ok, err = 1, true, nil
	while g0 + slice <= #groups do
		ok, err = xpcall(apply_groups, traceback, def, job, ctx, g0, g0 + slice - 1)
		if not ok then break end
		local o = store_groups(def, job, states, g0, g0 + slice - 1)
		if o then return o end
		conn:flush()
		g0 = g0 + slice
	end
	if ok then ok, err = xpcall(apply_groups, traceback, def, job, ctx, g0, #groups) end
	if one_by_one and conn:ok() then pipe.on = conn:pipeline(true) and true or false end
	if not ok then
		core.beat()
		ctx.event = nil
		fail_i, fail_err = S.cur, err
		if fail_i == 0 then fail_i = 1 end
		if is_memory(err) then
			-- drop what the handler built before anything else runs
			-- (with no allocation: a new key, even for nil, may need one)
			for _, g in ipairs(job.groups) do
				if g.state ~= nil then g.state = nil end
				if g.out ~= nil then g.out = nil end
			end
			collectgarbage("collect")
			S.out_of_memory = true
			fail_err = def.file .. ": not enough memory"
		end
		S.cur = 0
	end
	if not fail_i then
		pipe.flush_hi = n
		local okf, ferr = ctx._flush()
		pipe.flush_hi = nil
		-- rows that cannot even be encoded: the events since the last flush
		if not okf then return outcome_of(job) or { lo = pipe.flush_lo, hi = n, err = ferr } end
	end
	if not fail_i then
		local o = store_groups(def, job, states, g0, #groups)
		if o then return o end
		conn:send_as(false, "COMMIT")
		if pipe.handler_sql then
			-- its session settings (SET without LOCAL) stay with the
			-- connection: undo them, so they never reach another
			-- projection's statements
			conn:send_as(false, "RESET ALL")
			conn:send_as(false, SESSION_SQL, unpack(SESSION_PARAMS))
		end
		if job.after_commit then job.after_commit(job) end
	end
	local o = outcome_of(job, fail_i, fail_err)
	if o then
		rollback()
	else
		-- counted where every batch commits, whichever path opened it (a
		-- job, the replay of a failure plan, a batch that lost a timer
		-- to another instance and ran again): 800 of 1,000 were counted
		-- when only the first path did
		timers.count_fired(def, job.fired)
	end
	return o
end

-- A tag for the statement that stores a job's states: a failure there is
-- one of events 1..n (see outcome_of).
local function state_tag(job)
	return { lo = 1, hi = math.max(1, #job.events), state = true }
end
M.transact, M.state_tag = transact, state_tag

-- A job opened for a plan reads exactly the plan's events (below the
-- horizon, and in a stream below its last version, nothing changes); if it
-- does not, a checkpoint moved meanwhile: give the job up, it runs again.
local function same_events(plan, events)
	for i, e in ipairs(plan.events) do
		if not events[i] or events[i].position ~= e.position then
			pipe_end()
			rollback()
			return false
		end
	end
	return true
end
M.same_events = same_events

return M
