-- Partition discovery: which streams of a partitioned projection's source
-- are behind their checkpoints, a page of a round at a time, the round's
-- place carried by a token the master keeps.
local reads = require "projhost.reads"
local S = require "projhost.worker.state"
local session = require "projhost.worker.session"
local lifecycle = require "projhost.worker.lifecycle"
local catchup = require "projhost.worker.catchup"

local q, rollback, dberror = session.q, session.rollback, session.dberror
local of = S.of
local prepare = lifecycle.prepare

local M = {}

-- Partition discovery: the streams of def's source whose version is past
-- their checkpoint (goengine's LoadOutOfSync), found from the streams
-- table or the events, never by a scan of either. A round of finds is one
-- of two kinds (issue 11, "idle costs nothing"):
--
--   a walk    every stream of the source in key order, FIND_WALK a page
--             (reads.walk_sql): when the projection starts, after a reset,
--             an operator's command ('0 *' wakes the master that way),
--             after a walk that found streams behind, and every
--             FULL_WALK_EVERY seconds as a safety net (paced: a page at a
--             time, other jobs run between pages);
--   a window  only the streams that got events since the last round: the
--             events after a position, below the horizon, in the order
--             pages read them (reads.window_sql). Every event committed
--             after a round's snapshot is past its horizon then (its
--             transaction was running or had not begun), so nothing is
--             missed; and the next round starts before the first event of
--             a stream still behind, so a stream found but not yet caught
--             up is looked at again. An idle host reads an empty window.
--
-- The round's place travels as a token: the master keeps the one a round
-- ends with and starts the next round from it (core/master.c, since):
--   ""                                   walk, from the first stream
--   "w XMIN FOUND T STREAM"              walk, going on after STREAM
--   "i TX POS T"                         window after (TX, POS), a new round
--   "e TX POS HTX HPOS FOUND T"          window, going on after (TX, POS)
-- XMIN: the horizon when the last walk began (its window starts there); T:
-- when (os.time); FOUND: 1 once the round found a stream behind; HTX HPOS:
-- where the next round starts ("-": after this round's last event).
local FIND_WALK = 5000
local FIND_WINDOW = 5000
local FULL_WALK_EVERY = 600

local function parse_token(s)
	local k = s:sub(1, 2)
	if k == "w " then
		local xmin, found, t, stream = s:match("^w (%d+) ([01]) (%d+) (.*)$")
		if xmin then return { kind = "w", xmin = xmin, found = found == "1", t = tonumber(t), stream = stream } end
	elseif k == "i " then
		local tx, pos, t = s:match("^i (%d+) (%d+) (%d+)$")
		if tx then return { kind = "i", tx = tx, pos = pos, t = tonumber(t) } end
	elseif k == "e " then
		local tx, pos, htx, hpos, found, t = s:match("^e (%d+) (%d+) (%S+) (%S+) ([01]) (%d+)$")
		if tx then
			return { kind = "e", tx = tx, pos = pos, htx = htx ~= "-" and htx or nil,
				hpos = hpos ~= "-" and hpos or nil, found = found == "1", t = tonumber(t) }
		end
	end
	return nil -- "" or unknown: a walk from the start
end

local function walk_token(xmin, found, t, stream)
	return ("w %s %d %d %s"):format(xmin, found and 1 or 0, t, stream)
end

-- A read of our own outside a batch, in one round trip under the reads'
-- planner settings (see projhost.reads). -> rows | nil, msg, code
local function planned(sql, ...)
	local conn = S.conn
	if not conn:pipeline(true) then return nil, "cannot enter pipeline mode" end
	conn:send("BEGIN")
	conn:send(reads.PLANNER_SQL)
	conn:send_query(sql, ...)
	conn:send("COMMIT")
	local ok, res, code = conn:sync(true)
	if conn:ok() then conn:pipeline(false) end
	if not ok then
		rollback()
		return nil, res, code
	end
	return res[3]
end

-- One page of a round. -> status ("more": the round goes on, "idle": it
-- ended, else the projection's status), the streams behind, the token to go
-- on with (or to start the next round from), whether the round found any,
-- and for a walk's page the walk (xmin, t, stream: where the page began).
local function find_partitions(def, token)
	local rt = of(def)
	-- a walk page read ahead is for the very next find only
	local ahead = S.walk_ahead
	S.walk_ahead = nil
	local ready, why = prepare(def)
	if ready ~= true then return ready, {}, token end
	local t = why ~= "reset" and parse_token(token) or nil
	if t and t.kind == "i" and os.time() - t.t >= FULL_WALK_EVERY then t = nil end
	local out = {}
	if not t or t.kind == "w" then
		if not t then
			local rows, err, code = q("SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xmin")
			if not rows then dberror(def, err, code); return "dberror", {}, token end
			t = { kind = "w", xmin = rows[1].xmin, found = false, t = os.time(), stream = "" }
		end
		local sql, params = reads.walk_sql(def)
		-- the page the last one read ahead (catchup.walked), if it is this
		-- one: the same definition (a reload may change the source) and place
		local rows = ahead and ahead.def == def and ahead.after == t.stream and ahead.rows
		if not rows then
			local err, code
			rows, err, code = planned(sql, rt.cp, t.stream, FIND_WALK, unpack(params))
			if not rows then dberror(def, err, code); return "dberror", {}, token end
		end
		local tail = rows[#rows]
		local more = tonumber(tail.n) == FIND_WALK
		-- new short streams are caught up on the way (worker/catchup.lua);
		-- the others are the master's, and "found"
		local applied, next_rows
		out, applied, next_rows = catchup.walked(def, rows, tonumber(tail.n),
			more and { sql = sql, params = { rt.cp, tail.last, FIND_WALK, unpack(params) } } or nil)
		if next_rows then S.walk_ahead = { def = def, after = tail.last, rows = next_rows } end
		local found = t.found or #out > 0
		if more then
			return "more", out, walk_token(t.xmin, found, t.t, tail.last), found, t, applied
		end
		-- the walk is over: a clean one hands over to windows from its
		-- start; after one that found streams behind, walk again
		return "idle", out, found and "" or ("i %s 0 %d"):format(t.xmin, t.t), found, t, applied
	end
	local sql, params = reads.window_sql(def)
	local rows, err, code = planned(sql, rt.cp, t.tx, t.pos, FIND_WINDOW, unpack(params))
	if not rows then dberror(def, err, code); return "dberror", {}, token end
	local tail = rows[#rows]
	if not tail or tail.stream_id then tail = nil end
	local htx, hpos = t.htx, t.hpos
	for i = 1, #rows - (tail and 1 or 0) do
		out[i] = rows[i].stream_id
		-- just before the first event of the first stream behind
		if i == 1 and not htx then htx, hpos = rows[i].tx, tostring(tonumber(rows[i].pos) - 1) end
	end
	local found = t.found or #out > 0
	if tail and tonumber(tail.n) == FIND_WINDOW then
		return "more", out, ("e %s %s %s %s %d %d"):format(tail.tx, tail.pos, htx or "-", hpos or "-",
			found and 1 or 0, t.t), found
	end
	local etx, epos = t.tx, t.pos
	if tail then etx, epos = tail.tx, tail.pos end
	if htx then etx, epos = htx, hpos end
	return "idle", out, ("i %s %s %d"):format(etx, epos, t.t), found
end
M.find_partitions, M.walk_token = find_partitions, walk_token

return M
