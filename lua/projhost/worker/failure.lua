-- Failure policy: what happens to an event that fails. The events whose
-- code overran its budget or killed its worker (the master says which);
-- on_error and the default action; settle, which commits every event
-- before the one that fails by itself and gives that one its action
-- (error_action: retry, skip, park, fail, stop), the attempt count kept
-- in its checkpoint row.
local core = require "projhost.core"
local guard = require "projhost.guard"
local P = require "projhost.projection"
local S = require "projhost.worker.state"
local session = require "projhost.worker.session"
local timers = require "projhost.worker.timers"

local log, first_line = session.log, session.first_line
local q, x, rollback = session.q, session.x, session.rollback
local ensure_conn, backoff, dberror = session.ensure_conn, session.backoff, session.dberror
local of = S.of
local overrun = S.overrun

local M = {}

-- default error action: retry with exponential backoff, then fail
local DEFAULT_RETRIES = 3

local ACTIONS = { retry = true, skip = true, park = true, fail = true, stop = true, hold = true }

-- A checkpoint status as the master is told it (core/proto.h): a partition
-- held behind a dead letter is "holding" - "held" tells the master that
-- events wait behind the xmin horizon, which it polls for.
local function reported(status)
	if status == "held" then return "holding" end
	return status
end
M.reported = reported

local function default_action(attempt)
	if attempt <= DEFAULT_RETRIES then return "retry", 0.5 * 2 ^ (attempt - 1) end
	return "fail"
end

-- Events whose code overran its budget or killed its worker (the master
-- tells the next job; S.overrun): projection -> { [position] = { kind,
-- reason } }.
-- kind "on_error" or "caught_up": that hook is not called again for it;
-- any other kind (handler, init, sql): the event fails without running.
local function overrun_at(def, position, kinds)
	local o = overrun[of(def).cp]
	local v = o and o[position]
	if v == nil then return nil end
	if type(v) ~= "table" then
		v = { kind = "handler", reason = ("overran its budget of %gs and was killed"):format(tonumber(v) or 0) }
	end
	if kinds and not kinds[v.kind or "handler"] then return nil end
	return v
end

local function overrun_clear(def, position)
	local o = overrun[of(def).cp]
	if o then o[position] = nil end
end

local HOOKS = { on_error = true, caught_up = true }
local NOT_HOOKS = { handler = true, init = true }
local SQL = { sql = true }

-- A worker died while the handlers' queued statements ran (kind sql): which
-- of them was too slow is not known, so the job runs them one at a time,
-- each under its own event's beat - the next overrun names the event.
local function serial(def, events)
	local o = overrun[of(def).cp]
	if not o or not next(o) then return false end
	for _, e in ipairs(events or {}) do
		if overrun_at(def, e.position, SQL) then return true end
	end
	return events == nil
end

-- Ask the projection's on_error what to do; fall back to the default when
-- it is missing, fails, overruns its budget or answers nonsense (and say so).
local function decide(def, err, e, attempt)
	local rt = of(def)
	if not def.on_error then return default_action(attempt) end
	-- which event, as every log line about one says (its position, stream
	-- and version are the line's fields)
	local at, about = def.file .. ": ", session.event_fields(e)
	local o = overrun_at(def, e.position, HOOKS)
	if o then
		overrun_clear(def, e.position)
		log("error", rt.cp, at .. "on_error " .. tostring(o.reason) .. "; using the default action", about)
		return default_action(attempt)
	end
	core.beat(e.position, "on_error")
	local ok, action, delay, opts = guard.call(def.budget, def.on_error, err, P.view(e), attempt)
	core.beat()
	if not ok then
		log("error", rt.cp, at .. "on_error itself failed (" .. first_line(action) .. "); using the default action", about)
		return default_action(attempt)
	end
	if type(action) ~= "string" or not ACTIONS[action] then
		log("error", rt.cp, at .. "on_error returned " .. (type(action) == "string" and action or type(action)) ..
			", expected retry|skip|park|hold|fail|stop; using the default action", about)
		return default_action(attempt)
	end
	if action == "retry" then
		local d = tonumber(delay)
		-- a delay that is not a finite number is no delay we can wait for
		if not d or d ~= d or d == math.huge or d == -math.huge then d = 0.5 * 2 ^ (attempt - 1) end
		delay = math.min(math.max(d, 0), 86400)
		-- "retry", delay, { silent = true }: no error line per attempt
		-- (the attempt is counted all the same). rawget: a table of the
		-- script's, whose metatable must not run here
		if type(opts) == "table" and rawget(opts, "silent") == true then return action, delay, true end
	end
	return action, delay
end
M.overrun_at, M.overrun_clear, M.serial, M.HOOKS, M.NOT_HOOKS = overrun_at, overrun_clear, serial, HOOKS, NOT_HOOKS

local function lock_checkpoint(def, part)
	local rows, err, code = q([[SELECT version, state::text AS state, last_tx::text AS last_tx,
		last_pos, status FROM projhost.checkpoints
		WHERE projection = $1 AND partition = $2 FOR UPDATE SKIP LOCKED]], of(def).cp, part)
	if not rows then return nil, err, code end
	return rows[1] or false
end
M.lock_checkpoint = lock_checkpoint

-- The error action for event e of partition part, after everything before
-- it has been committed: its checkpoint is where `prev` says (a check: if
-- another worker or instance moved it meanwhile, nothing is done and the
-- job runs again). The attempt count lives in the checkpoint row, so it
-- survives worker restarts and is shared by every worker and instance.
-- Returns status, delay.
local function error_action(def, part, e, err, prev)
	local rt = of(def)
	local timer = rawget(e, "timer")
	local what = timer and (rawget(e, "tick") and "tick" or string.format("timer %s%s%s (%s)",
			part ~= "" and part or "", rawget(e, "key") and " key " or "", rawget(e, "key") or "", e.type))
		or string.format("event %s@%d (%s)", e.stream, e.version, e.type)
	-- the checkpoint's error column says where as text; the log line has fields
	local where = timer and what or string.format("pos=%d ", e.position) .. what
	if not ensure_conn() then return "dberror", backoff() end
	local ok, xerr, xcode = x("BEGIN")
	local row
	if ok and part ~= "" then
		-- a new partition's row was made by the batch that rolled back
		ok, xerr, xcode = x([[INSERT INTO projhost.checkpoints (projection, partition, version)
			VALUES ($1, $2, $3) ON CONFLICT DO NOTHING]], rt.cp, part, def.version)
	end
	if ok then
		row, xerr, xcode = lock_checkpoint(def, part)
		ok = row
	end
	if ok == nil then return "dberror", dberror(def, xerr, xcode) end
	if row == false then rollback(); return "locked", 0 end
	if row.status ~= "running" then rollback(); return reported(row.status), 0 end
	if prev and (tonumber(row.last_pos) ~= prev.pos or (prev.tx and row.last_tx ~= prev.tx)) then
		rollback()
		return "more", 0
	end
	local rows
	rows, xerr, xcode = q([[UPDATE projhost.checkpoints
		SET attempts = CASE WHEN retry_pos = $3 THEN attempts + 1 ELSE 1 END,
			retry_pos = $3, error = $4, updated_at = now()
		WHERE projection = $1 AND partition = $2 RETURNING attempts]],
		rt.cp, part, e.position, where .. ": " .. first_line(err))
	if not rows then return "dberror", dberror(def, xerr, xcode) end
	local attempt = tonumber(rows[1].attempts)
	local action, delay, silent = decide(def, err, e, attempt)
	if action == "hold" and part == "" then
		-- an unpartitioned projection has one order for everything: holding
		-- it would stop the projection (that is "stop"); it parks instead
		log("warn", rt.cp, def.file .. ": on_error returned hold, which needs a partitioned projection "
			.. "(partition = \"stream\"); parking the event instead", session.event_fields(e))
		action = "park"
	end
	if action == "hold" and timer then
		-- a timer has no dead letter of its own: its partition stops
		-- (failed) with the timer kept, and `resume --partition` fires it
		log("warn", rt.cp, def.file .. ": on_error returned hold for a timer; failing its partition instead "
			.. "(projhost resume fires it again)")
		action = "fail"
	end
	local fkey = rt.cp .. "\t" .. action
	S.fails[fkey] = (S.fails[fkey] or 0) + 1
	if not silent then
		log("error", rt.cp, string.format("%s failed (attempt %d): %s -> %s%s", what, attempt,
			first_line(err), action, action == "retry" and string.format(" in %.2fs", delay) or ""),
			session.event_fields(e))
	end
	local status = "more"
	ok = true
	if action == "retry" then
		status = "retry"
	elseif timer and (action == "skip" or action == "park") then
		-- a timer is dropped (a tick re-armed): the error line above says
		-- which, with its data's type and key
		ok, xerr, xcode = timers.drop(def, e, x)
		if ok then
			log("error", rt.cp, string.format("%s: %s dropped after on_error %q", def.file, what, action))
		end
	elseif action == "skip" or action == "park" then
		-- move past the event; unpartitioned checkpoints are (tx, position),
		-- partitioned ones the stream version
		if part == "" then
			ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET last_tx = $3::xid8, last_pos = $4,
				error = NULL, updated_at = now() WHERE projection = $1 AND partition = $2]],
				rt.cp, part, e.tx, e.position)
		else
			ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET last_pos = $3,
				error = NULL, updated_at = now() WHERE projection = $1 AND partition = $2]],
				rt.cp, part, e.version)
		end
		if ok and action == "skip" then
			-- so that wait_for can say it was skipped (issue 13)
			ok, xerr, xcode = x([[INSERT INTO projhost.skipped (projection, partition, global_position,
				stream_id, stream_version, error) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING]],
				rt.cp, part, e.position, e.stream, e.version, first_line(err))
		end
		if ok and action == "park" then
			ok, xerr, xcode = x([[INSERT INTO projhost.parked (projection, partition, global_position,
				event_id, stream_id, stream_version, event_type, error, attempts)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)]], rt.cp, part, e.position, e.id,
				e.stream, e.version, e.type, first_line(err), attempt)
		end
	elseif action == "hold" then
		-- the event stays where it is (the checkpoint is just before it)
		-- and the partition waits behind it: parked, marked hold, and the
		-- checkpoint 'held', so neither discovery nor a batch reads it
		-- until `parked retry` (status running again: the next batch
		-- applies it, then the rest) or `parked skip` (past it)
		status = "holding"
		ok, xerr, xcode = x([[INSERT INTO projhost.parked (projection, partition, global_position,
			event_id, stream_id, stream_version, event_type, error, attempts, hold)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, true)]], rt.cp, part, e.position, e.id,
			e.stream, e.version, e.type, first_line(err), attempt)
		if ok then
			ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET status = 'held', updated_at = now()
				WHERE projection = $1 AND partition = $2]], rt.cp, part)
		end
	elseif action == "fail" then
		status = "failed"
		ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET status = 'failed', updated_at = now()
			WHERE projection = $1 AND partition = $2]], rt.cp, part)
	else
		-- stop: the whole projection, whatever the partition
		status = "stopped"
		ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET status = 'stopped', error = $2, updated_at = now()
			WHERE projection = $1 AND partition = '']], rt.cp, where .. ": " .. first_line(err))
	end
	if ok then ok, xerr, xcode = x("COMMIT") end
	if not ok then return "dberror", dberror(def, xerr, xcode) end
	overrun_clear(def, e.position)
	return status, delay or 0
end

-- Events before `upto` of plan (a list of events with .partition, in
-- the order a job applies them), and where each partition starts.
local function head_of(plan, upto)
	local h = { events = {}, start = plan.start, kind = plan.kind }
	for i = 1, upto - 1 do h.events[i] = plan.events[i] end
	h.next = plan.events[upto]
	return h
end

-- plan without its first m events (they committed): each partition now
-- starts after the last of them it had.
local function tail_of(plan, m)
	local start = {}
	for p, s in pairs(plan.start) do start[p] = s end
	for i = 1, m do
		local e = plan.events[i]
		-- unpartitioned checkpoints are (tx, position), partitioned ones
		-- the stream version; a timer moves neither
		if not rawget(e, "timer") then
			if plan.kind == "parts" then
				start[e.partition] = { pos = e.version }
			else
				start[e.partition] = { tx = e.tx, pos = e.position }
			end
		end
	end
	local t = { events = {}, start = start, kind = plan.kind, next = plan.next }
	for i = m + 1, #plan.events do t.events[#t.events + 1] = plan.events[i] end
	return t
end

-- The job's events failed (o = { lo, hi, err }: the first failure lies in
-- events lo..hi). Commit, in transactions of their own (attempt(plan) runs
-- exactly plan's events from plan.start, or answers a status when a
-- checkpoint moved), every event before the one that fails by itself, and
-- give that one its action. Returns status, delay, committed count, the
-- failing event (when its action was taken).
local function settle(def, plan, o, attempt)
	local committed = 0
	while true do
		if o.status then return o.status, o.delay or 0, committed end
		local n = #plan.events
		local lo, hi = math.max(1, o.lo), math.min(n, math.max(o.lo, o.hi))
		if n == 0 or lo > n then return "more", 0, committed end
		if lo == hi and (lo == 1 or o.exact) then
			local e = plan.events[lo]
			if lo > 1 then
				-- commit the events before it first
				local o2 = attempt(head_of(plan, lo))
				if o2 then
					plan, o = head_of(plan, lo), o2
					goto continue
				end
				committed = committed + lo - 1
				plan = tail_of(plan, lo - 1)
			end
			local st, delay = error_action(def, e.partition, e, o.err, plan.start[e.partition])
			return st, delay, committed, e
		end
		do
			-- narrow it down: commit the events before lo, or half of lo..hi
			local m = lo > 1 and lo - 1 or math.max(1, math.floor((hi - lo + 1) / 2))
			local h = head_of(plan, m + 1)
			local o2 = attempt(h)
			if o2 then
				-- the failure lies within the head
				plan, o = h, o2
				if o2.lo and o2.lo == o2.hi then o.exact = true end
			else
				committed = committed + m
				plan = tail_of(plan, m)
				o = { lo = lo - m, hi = hi - m, err = o.err, exact = o.exact }
				if o.hi < 1 then return "more", 0, committed end
				if o.lo < 1 then o.lo = 1 end
				-- one event left in the range: it fails by itself, or
				-- (a failure that depended on events after it) not
				if o.lo == o.hi then
					local o3 = attempt(head_of(plan, 2))
					if not o3 then return "more", 0, committed + 1 end
					plan, o = head_of(plan, 2), o3
					o.exact = true
				end
			end
		end
		::continue::
	end
end
M.settle = settle

return M
