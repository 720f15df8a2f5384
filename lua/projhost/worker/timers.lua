-- Durable timers (issue 14 section 2; README "Timers"): ctx:schedule's and
-- ctx:cancel's statements, the due timers a batch fires (read with its
-- events, merged into each partition's order, deleted in its transaction),
-- the every = SECONDS tick (a timer row of the reserved key '' that firing
-- re-arms), and what tells the master when to look next ("due" lines,
-- core/proto.h), so a host with nothing due sleeps until the next due time.
--
-- projhost.timers (schema.lua's last step): one row per pending timer,
-- (projection, partition, key) unique for keyed ones, (projection, due)
-- indexed. A timer belongs to its checkpoint name (NAME, or NAME@V in a
-- shadow rebuild, whose timers replace the old version's at the switch).
--
-- Exactly once: a timer of partition P is read and deleted only by a batch
-- that holds P's checkpoint row lock (FOR UPDATE in the batch's open), so
-- two workers or instances never both fire it; the delete, the handler's
-- work, the state and the checkpoint commit together, and a batch that
-- rolls back (an error, SIGKILL) leaves the timer where it was.
local core = require "projhost.core"
local P = require "projhost.projection"
local reads = require "projhost.reads"
local S = require "projhost.worker.state"

local of = S.of
local pipe = S.pipe

local M = {}

-- due timers one batch fires at most (the job's partitions together); a
-- partition with more due goes on in its next batch
M.PER_JOB = 1024
-- partitions with due timers one discovery lists at most
local FIND_DUE = 5000

-- A timer is runnable when its partition is running (or has no row yet):
-- the timers of a failed, paused, held or done partition wait with it and
-- never make the master look again and again.
local RUNNABLE = [[NOT EXISTS (SELECT 1 FROM projhost.checkpoints c
		WHERE c.projection = t.projection AND c.partition = t.partition AND c.status <> 'running')]]

-- The batch's timers, read in the batch's open (after its checkpoint
-- locks, in the same transaction): $1 checkpoint name, $2 the partitions
-- ({""} unpartitioned), $3 at most, $4 only these ids (a failure plan's)
-- or NULL, $5 unpartitioned (then next_s is computed; else each timer
-- comes with its partition's state: a partition with due timers and no
-- new event has no state in the events' read). The first row is not a
-- timer: now_s, the transaction's now() as unix time, and next_s, seconds
-- from it to the projection's next runnable timer not yet due; in the
-- timers' rows now_s is their due time as unix time.
M.BATCH_SQL = [[SELECT NULL::bigint AS id, NULL::text AS partition, NULL::text AS key, NULL::text AS type,
		NULL::text AS data, NULL::text AS due, NULL::text AS state, extract(epoch FROM now())::float8 AS now_s,
		CASE WHEN $5 THEN (SELECT extract(epoch FROM t.due - now())::float8 FROM projhost.timers t
			WHERE t.projection = $1 AND t.due > now() AND ]] .. RUNNABLE .. [[ ORDER BY t.due LIMIT 1) END AS next_s
	UNION ALL
	(SELECT t.id, t.partition, t.key, t.timer_type, t.data::text, t.due::text,
		CASE WHEN NOT $5 THEN (SELECT c.state::text FROM projhost.checkpoints c
			WHERE c.projection = $1 AND c.partition = t.partition) END,
		extract(epoch FROM t.due)::float8, NULL
	FROM projhost.timers t
	WHERE t.projection = $1 AND t.due <= now() AND t.partition = ANY($2::text[])
		AND ($4::bigint[] IS NULL OR t.id = ANY($4::bigint[]))
	ORDER BY t.due, t.id LIMIT $3)]]

-- Partitions with runnable due timers, and the seconds to the next
-- runnable timer not yet due (a row without partition), for the discovery
-- of a partitioned projection: partition '' is never one of its partitions
-- (a timer left from when it was unpartitioned), and listed it would wake
-- the discovery itself again and again.
local FIND_SQL = [[(SELECT t.partition, NULL::float8 AS next_s FROM projhost.timers t
		WHERE t.projection = $1 AND t.due <= now() AND t.partition <> '' AND ]] .. RUNNABLE .. [[
		ORDER BY t.due LIMIT $2)
	UNION ALL
	(SELECT NULL, extract(epoch FROM t.due - now())::float8 FROM projhost.timers t
		WHERE t.projection = $1 AND t.due > now() AND t.partition <> '' AND ]] .. RUNNABLE .. [[
		ORDER BY t.due LIMIT 1)]]

local SCHEDULE_DELAY_SQL = [[INSERT INTO projhost.timers (projection, partition, key, due, timer_type, data)
	VALUES ($1, $2, $3, now() + $4 * interval '1 second', $5, $6::jsonb)
	ON CONFLICT (projection, partition, key) DO UPDATE
	SET due = EXCLUDED.due, timer_type = EXCLUDED.timer_type, data = EXCLUDED.data, created_at = now()]]
local SCHEDULE_AT_SQL = [[INSERT INTO projhost.timers (projection, partition, key, due, timer_type, data)
	VALUES ($1, $2, $3, to_timestamp($4), $5, $6::jsonb)
	ON CONFLICT (projection, partition, key) DO UPDATE
	SET due = EXCLUDED.due, timer_type = EXCLUDED.timer_type, data = EXCLUDED.data, created_at = now()]]
local CANCEL_SQL = [[DELETE FROM projhost.timers WHERE projection = $1 AND partition = $2 AND key = $3]]
-- the tick's next due time: the first slot of the interval after now (ticks
-- missed while no host ran are not made up: one tick, then on the beat)
local REARM_SQL = [[INSERT INTO projhost.timers (projection, partition, key, due, timer_type)
	SELECT $1, '', '', d + ($3 * (floor(greatest(extract(epoch FROM now() - d), 0) / $3) + 1))
		* interval '1 second', 'tick'
	FROM (SELECT $2::timestamptz AS d) x
	ON CONFLICT (projection, partition, key) DO NOTHING]]

-- The reserved key of an every = SECONDS tick (ctx:schedule's keys are
-- never empty).
M.TICK_KEY = ""

-- "2026-11-22T22:55:40.123456Z" (an event's e.time) as unix time; nil for
-- what is not in that form.
local function days_from_civil(y, m, d)
	y = m <= 2 and y - 1 or y
	local era = math.floor(y / 400)
	local yoe = y - era * 400
	local mp = (m + 9) % 12
	local doy = math.floor((153 * mp + 2) / 5) + d - 1
	local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
	return era * 146097 + doe - 719468
end

local function epoch_of(t)
	if type(t) ~= "string" then return nil end
	local y, mo, d, hh, mi, ss = t:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d%.?%d*)Z$")
	if not y then return nil end
	return days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400 + tonumber(hh) * 3600
		+ tonumber(mi) * 60 + tonumber(ss)
end
M.epoch_of = epoch_of

-- a timestamptz as the session prints it (UTC, ISO) -> as events' e.time
local function event_time(text)
	return (text:gsub(" ", "T", 1):gsub("%+00$", "Z"))
end

---------------------------------------------------------------------------
-- ctx:schedule / ctx:cancel: statements of the batch, queued on its
-- pipeline like ctx:exec and tagged with the event that made them (an
-- error is that event's); the earliest due time a batch scheduled goes to
-- the master after COMMIT (pipe.sched_rel: seconds after the
-- transaction's start; pipe.sched_at: unix time).

function M.backend(def, b, send)
	local rt = of(def)
	function b.schedule(t)
		local data = t.data
		local ok, body = true, nil
		if data ~= nil then ok, body = P.encode(data) end
		if not ok then return nil, "data cannot be encoded as JSON: " .. tostring(body) end
		local tag = S.cur > 0 and S.cur or false
		local sent, err, code
		if t.at then
			sent, err, code = send(tag, SCHEDULE_AT_SQL, rt.cp, t.partition, t.key, t.at, t.type, body)
			if sent and (not pipe.sched_at or t.at < pipe.sched_at) then pipe.sched_at = t.at end
		else
			sent, err, code = send(tag, SCHEDULE_DELAY_SQL, rt.cp, t.partition, t.key, t.delay, t.type, body)
			if sent and (not pipe.sched_rel or t.delay < pipe.sched_rel) then pipe.sched_rel = t.delay end
		end
		return sent, err, code
	end
	function b.cancel(part, key)
		return send(S.cur > 0 and S.cur or false, CANCEL_SQL, rt.cp, part, key)
	end
end

-- A new batch: nothing scheduled yet.
function M.begin()
	pipe.sched_rel, pipe.sched_at, pipe.now_s, pipe.next_s, pipe.opened_at = nil, nil, nil, nil, nil
end

---------------------------------------------------------------------------
-- The batch's due timers.

-- Queue the read of the due timers of partitions `parts` (in the batch's
-- open pipeline, after its locks). ids: only these (a failure plan's).
-- The ids of a plan's timers (nil: not a plan).
function M.plan_ids(plan)
	if not plan then return nil end
	local ids = {}
	for _, e in ipairs(plan.events) do
		if rawget(e, "timer") then ids[#ids + 1] = e.id end
	end
	return ids
end

function M.send_read(def, parts, ids)
	local rt = of(def)
	local id_arr = ids and ("{" .. table.concat(ids, ",") .. "}") or nil
	S.conn:send_query(M.BATCH_SQL, rt.cp, reads.pg_text_array(parts), M.PER_JOB, id_arr, not def.partition)
end

-- The rows of that read: partition -> its timers (due order) as items of
-- the job; also notes now_s / next_s. Returns by_part, truncated (the
-- limit was reached: partitions may have more due).
function M.take_read(rows)
	local by_part, n = {}, 0
	for _, r in ipairs(rows or {}) do
		local id = tonumber(r.id)
		if not id then
			-- the row that is not a timer
			pipe.now_s, pipe.next_s = tonumber(r.now_s), tonumber(r.next_s)
			pipe.opened_at = core.monotime()
		else
			local item = {
				timer = true, tick = r.key == M.TICK_KEY or nil, id = id,
				-- the host's own: names the timer to the watchdog and to the
				-- failure path (never shown to a handler, see projection.timer_view)
				position = -id,
				type = r.type, key = r.key ~= M.TICK_KEY and r.key or nil, partition = r.partition,
				stream = r.partition ~= "" and r.partition or nil,
				due = tonumber(r.now_s), due_text = r.due, time = event_time(r.due),
				data = r.data and P.json.decode(r.data) or {},
			}
			local l = by_part[r.partition]
			if not l then l = { state = r.state }; by_part[r.partition] = l end
			l[#l + 1] = item
			n = n + 1
		end
	end
	return by_part, n >= M.PER_JOB
end

-- Merge each group's due timers into its events: a timer due at T comes
-- after the group's events of the batch whose time (created_at) is at or
-- before T and before the later ones. A group whose read was cut short
-- ("more": a full page) gets only the timers due before its last event
-- read - the others come after the events still to be read, in a later
-- batch - unless `all` (a failure plan: exactly its timers). Renumbers
-- e.index and the groups' i0..i1. Returns the new events list, the
-- count of real events and the last of them, the timers fired (ids).
local NONE = setmetatable({}, { __newindex = function() error("timers: NONE is read-only", 2) end })

function M.merge(events, groups, by_part, all)
	-- nearly every batch: no timer is due, the events stay as they are
	if next(by_part) == nil then return events, #events, events[#events], NONE end
	local out, fired, n_ev, last_ev = {}, {}, 0, nil
	for _, g in ipairs(groups) do
		local ts = by_part[g.part] or {}
		local i0 = #out + 1
		local k = 1
		local full = g.status == "more" and not all
		local last_t = full and g.i1 >= g.i0 and epoch_of(events[g.i1].time) or nil
		for i = g.i0, g.i1 do
			local e = events[i]
			local et = ts[k] and epoch_of(e.time)
			while ts[k] and et and ts[k].due < et do
				local t = ts[k]
				t._after = e.version and e.version - 1 or nil
				out[#out + 1] = t
				k = k + 1
			end
			out[#out + 1] = e
			n_ev, last_ev = n_ev + 1, e
		end
		while ts[k] and (not full or (last_t and ts[k].due <= last_t)) do
			local t = ts[k]
			t._after = g.last
			out[#out + 1] = t
			k = k + 1
		end
		g.i0, g.i1 = i0, #out
	end
	for i, e in ipairs(out) do
		e.index = i
		if rawget(e, "timer") then fired[#fired + 1] = e.id end
	end
	return out, n_ev, last_ev, fired
end

-- Queue the delete of the fired timers (before the handlers' statements,
-- so a handler that schedules the same key again makes a new timer) and
-- the re-arm of a tick. projhost.fire_timers raises 40001 when a timer is
-- gone (never so while the checkpoint locks hold): the batch rolls back.
function M.send_fire(def, events, fired)
	if #fired == 0 then return end
	local conn = S.conn
	conn:send_as(false, "SELECT projhost.fire_timers($1::bigint[])", "{" .. table.concat(fired, ",") .. "}")
	for _, e in ipairs(events) do
		if rawget(e, "tick") and def.every then
			conn:send_as(false, REARM_SQL, of(def).cp, e.due_text, def.every)
			-- (REARM_SQL's next due time, for the master: see after_commit)
			if pipe.now_s then
				local nx = e.due + def.every * (math.floor(math.max(pipe.now_s - e.due, 0) / def.every) + 1)
				local rel = nx - pipe.now_s
				if not pipe.sched_rel or rel < pipe.sched_rel then pipe.sched_rel = rel end
			end
		end
	end
end

-- The partitions of a job given to `ctx:done()`: their timers go with
-- them (a finished partition costs nothing).
function M.send_drop_parts(def, parts)
	S.conn:send_as(false, "DELETE FROM projhost.timers WHERE projection = $1 AND partition = ANY($2::text[])",
		of(def).cp, reads.pg_text_array(parts))
end

-- After COMMIT: seconds from now to the earliest timer the master must
-- wake the projection for (what this batch scheduled; for an unpartitioned
-- projection also its next timer not yet due), or nil.
function M.after_commit(def)
	local rt = of(def)
	local d
	local elapsed = pipe.opened_at and (core.monotime() - pipe.opened_at) or 0
	if pipe.sched_rel then d = pipe.sched_rel - elapsed end
	if pipe.sched_at and pipe.now_s then
		local a = pipe.sched_at - pipe.now_s - elapsed
		if not d or a < d then d = a end
	end
	if not def.partition and pipe.next_s then
		local nx = pipe.next_s - elapsed
		if not d or nx < d then d = nx end
	end
	if d then
		d = math.max(0, d)
		local cur = S.timer_due[rt.cp]
		if not cur or d < cur then S.timer_due[rt.cp] = d end
	end
end

-- A batch that committed fired n timers: counted for the log line and the
-- master's projhost_timers_fired_total.
function M.count_fired(def, n)
	if not n or n == 0 then return end
	local cp = of(def).cp
	S.fired_log[cp] = (S.fired_log[cp] or 0) + n
	S.fired[cp] = (S.fired[cp] or 0) + n
end

-- The "fired" line of an answer for checkpoint name cp, or nil.
function M.fired_line(wire, cp)
	local n = S.fired[cp]
	if not n then return nil end
	S.fired[cp] = nil
	return wire.line("fired", cp, n)
end

-- The "due" line of an answer for checkpoint name cp, or nil.
function M.due_line(wire, cp)
	local d = S.timer_due[cp]
	if not d then return nil end
	S.timer_due[cp] = nil
	-- a millisecond late rather than early (the master's clock is not the
	-- server's): never a wake-up that finds it not due yet, again and again;
	-- 0 (due now) stays 0, which --once waits for too
	return wire.line("due", cp, d > 0 and string.format("%.3f", d + 0.001) or "0")
end

-- Discovery: the partitions with runnable due timers (at most FIND_DUE),
-- and notes the seconds to the next one not yet due. -> list | nil, err, code
function M.find_due(def)
	local rt = of(def)
	-- (the connection may have gone since the discovery's own read)
	if not S.conn or not S.conn:ok() then return nil, "no connection" end
	local rows, err, code = S.conn:query(FIND_SQL, rt.cp, FIND_DUE)
	if not rows then return nil, err, code end
	local out = {}
	for _, r in ipairs(rows) do
		if r.partition then
			out[#out + 1] = r.partition
		elseif r.next_s then
			local d = math.max(0, tonumber(r.next_s))
			local cur = S.timer_due[rt.cp]
			if not cur or d < cur then S.timer_due[rt.cp] = d end
		end
	end
	return out
end

-- every = SECONDS: the tick's row, made when the projection is set up (due
-- one interval later; an existing one is kept); a projection without
-- every loses one it had. -> ok | nil, err, code (x: session.x)
function M.arm(def, x)
	local cp = of(def).cp
	if def.every then
		return x([[INSERT INTO projhost.timers (projection, partition, key, due, timer_type)
			VALUES ($1, '', '', now() + $2 * interval '1 second', 'tick') ON CONFLICT DO NOTHING]], cp, def.every)
	end
	return x("DELETE FROM projhost.timers WHERE projection = $1 AND partition = '' AND key = ''", cp)
end

-- A timer whose handler failed and whose action moves past it (skip, park):
-- it is dropped (a timer has no dead letter of its own; the error line
-- says which), a tick re-armed instead. -> ok | nil, err, code
function M.drop(def, e, x)
	local ok, err, code = x("DELETE FROM projhost.timers WHERE id = $1", e.id)
	if ok and rawget(e, "tick") and def.every then ok, err, code = x(REARM_SQL, of(def).cp, e.due_text, def.every) end
	return ok, err, code
end

return M
