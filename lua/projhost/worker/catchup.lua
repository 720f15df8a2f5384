-- New partitions caught up inside discovery (issue 11: a partitioned
-- catch-up over 1,000,000 streams of one or two events each). A walk's page
-- lists the streams behind; those with no checkpoint row yet and only a few
-- events (FRESH_MAX) are applied here, by the worker that walked them, in
-- transactions of up to CHUNK partitions, and only the others go to the
-- master to be queued and handed out as jobs (worker/parts.lua).
--
-- Why: such a partition costs its job far more than its events do. Per
-- partition the job path pays a queue entry and two protocol lines in the
-- master, a checkpoint lookup and lock and an index descent in PARTS_SQL,
-- and a second walk of every stream at the end (a walk that found streams
-- walks again to see them caught up): measured ~40 us a partition against
-- ~6 us an event (1,000,000 streams x 1.3 events: 41-53 s; 100,000 x 13.5:
-- 10-12 s). Here a page's new streams are read as one range of the events'
-- key (reads.catchup_sql), their rows are made by one INSERT, and a walk
-- whose streams were all caught up on its way is the last one (it found
-- nothing left for the master: the round then goes on with windows, see
-- discovery.lua).
--
-- Streams with more events go to the master as before: their events, not
-- their partition, are what costs, and jobs spread them over the workers
-- (a discovery round runs on one worker at a time).
--
-- The rules are the job path's, with the same code (parts.groups_of,
-- parts.store_parts, transact): each partition from version 1 in version
-- order, up to a gap (held: a version still in flight holds its
-- partition; it goes to the master, which retries it), in one transaction
-- with its checkpoint row. Nothing is locked: the row does not exist, and
-- two workers or instances that take the same partition as new cannot
-- both commit it - the second INSERT waits for the first transaction and
-- fails on the primary key (23505), which rolls its chunk back whole. A
-- chunk that does not commit (that, a handler's error, an overrun the
-- master charged to this round, the database) runs again at once as a
-- job (parts.run_partitions): the job path reads each partition again
-- from its row (or from its start) and gives failures their actions. A
-- crash loses only uncommitted chunks.
local reads = require "projhost.reads"
local S = require "projhost.worker.state"
local session = require "projhost.worker.session"
local ctxm = require "projhost.worker.ctx"
local transact_m = require "projhost.worker.transact"
local lifecycle = require "projhost.worker.lifecycle"
local parts = require "projhost.worker.parts"
local timers = require "projhost.worker.timers"

local log, rollback, dberror = session.log, session.rollback, session.dberror
local pipe_begin, pipe_end, take_ahead = ctxm.pipe_begin, ctxm.pipe_end, ctxm.take_ahead
local transact, ASYNC_CATCHUP = transact_m.transact, transact_m.ASYNC_CATCHUP
local report = lifecycle.report
local groups_of, store_parts, inserted = parts.groups_of, parts.store_parts, parts.inserted
local run_partitions = parts.run_partitions
local pg_text_array = reads.pg_text_array
local of = S.of
local pipe, planner_session = S.pipe, S.planner_session

local M = {}

-- A new stream of at most this many events is caught up here (its
-- partition's fixed costs on the job path are several times its events').
local FRESH_MAX = 4
-- Partitions a transaction (the master's PH_GROUP), and events: a read
-- that reaches JOB_EVENTS (a streams row behind its events: plain SQL)
-- gives the chunk to the master.
local CHUNK = 1024
local JOB_EVENTS = parts.JOB_EVENTS
local BATCH = transact_m.BATCH

-- Queue the read of a chunk's events: `c` = { list, range } (see chunk);
-- as events, or as a page when read ahead; or c = { walk = { sql, params } },
-- the walk's next page (rows). -> its statement number
local function send_read(def, c, ahead)
	local conn = S.conn
	if c.walk then return conn:send_query_as(false, c.walk.sql, unpack(c.walk.params)) end
	local sql = reads.catchup_sql(c.range) .. " LIMIT " .. JOB_EVENTS
	local send = ahead and conn.send_page_as or conn.send_events_as
	if c.range then
		return send(conn, false, sql, not def.own_events, def.name, c.list[1], c.list[#c.list])
	end
	return send(conn, false, sql, not def.own_events, def.name, pg_text_array(c.list))
end

-- One chunk: c.list (stream names in key order, all new); c.range: every stream
-- of the key range list[1]..list[#list] is in the list; c.ahead: its
-- events, read ahead by the chunk before ({ page, events? }, see
-- ctx.take_ahead). nxt: the chunk after it, read ahead now (so the server
-- reads it while this one is handled here: 1,000,000 streams x 1.3 events,
-- the worker and the server took turns), or after the last chunk the
-- walk's next page (see M.walked). The events are the same as if
-- read later: no checkpoint row of their streams is read, and the one
-- this chunk's INSERT makes fails if another worker made it meanwhile
-- (below). -> results { [stream] = { status } }, events applied; nil: not
-- committed. Either way pipe.ahead_page is what nxt read, if it was.
local function chunk(def, c, nxt)
	local rt = of(def)
	local conn = S.conn
	local list = c.list
	pipe_begin()
	if not pipe.on then return nil end
	conn:send("BEGIN")
	-- shared: a version reset (exclusive) waits for batches in flight
	conn:send("SELECT pg_advisory_xact_lock_shared(hashtext('projhost:' || $1))", rt.cp)
	conn:send(reads.PLANNER_SQL)
	if not c.ahead then send_read(def, c, false) end
	local ok, res, code = conn:sync(true)
	if not ok then
		pipe.on = false
		if conn:ok() then conn:pipeline(false) end
		dberror(def, res, code)
		return nil
	end
	if nxt then
		local idx = send_read(def, nxt, true)
		if idx then
			pipe.ahead = idx
			conn:flush()
		end
	end
	local evrows = c.ahead and (c.ahead.events or c.ahead.page:events()) or res[4]
	if #evrows >= JOB_EVENTS then
		pipe_end()
		rollback()
		return nil
	end
	conn:send_as(false, reads.RESTORE_SQL, unpack(planner_session))
	local want, by_part, locked = {}, {}, {}
	for i, p in ipairs(list) do
		want[p] = true
		locked[i] = { partition = p, last_pos = 0, new = true }
	end
	for _, r in ipairs(evrows) do
		local p = rawget(r, "partition")
		-- (a range's stream made since the walk: left to the master)
		if want[p] then
			local l = by_part[p]
			if not l then l = {}; by_part[p] = l end
			l[#l + 1] = r
		end
	end
	local results = {}
	local events, groups = groups_of(def, locked, by_part, BATCH, nil, results)
	if #groups == 0 then
		pipe_end()
		rollback()
		return results, 0
	end
	local job = { def = def, store = store_parts, results = results, events = events, groups = groups,
		start = {}, after_commit = take_ahead }
	for _, p in ipairs(list) do job.start[p] = { pos = 0 } end
	if ASYNC_CATCHUP and #groups > 1 then
		-- a catch-up: see open_parts in worker/parts.lua
		if conn:send_as(false, "SET LOCAL synchronous_commit = off") then pipe.async = true end
	end
	if transact(def, job) then return nil end
	local total = 0
	for _, g in ipairs(groups) do
		-- applied here (a partition the statement found nothing of is
		-- in results with its status too, but was not)
		results[g.part] = { g.status, applied = true }
		total = total + (g.last - g.start)
	end
	S.db_failures = 0
	report(def, total, nil, false)
	-- timers its handlers scheduled: the master hears when the next is due
	timers.after_commit(def)
	inserted(def, job.inserted)
	return results, total
end

--- A walk's page: rows as reads.walk_sql gives them (the streams behind,
--- then the tail row), n = how many streams the page walked. Catches up
--- the new short streams among them; -> the streams for the master (in
--- the page's order), the events applied here, and the rows of the walk's
--- next page if `walk_next` ({ sql, params }) asked for them: the last
--- chunk reads it ahead (a walk over 1,000,000 new streams waited ~2 s for
--- its pages). Like any walk page it says which streams were behind when
--- it was read - a moment before it is used: discovery is a hint that the
--- job path checks, and what commits after the walk began is in the
--- window after it (see discovery.lua).
function M.walked(def, rows, n, walk_next)
	local out, fresh = {}, {}
	for i = 1, #rows - 1 do
		local r = rows[i]
		local v = tonumber(r.version)
		if (r.fresh == "t" or r.fresh == true) and v and v <= FRESH_MAX then
			fresh[#fresh + 1] = r.stream_id
		else
			out[#out + 1] = r.stream_id
		end
	end
	if #fresh == 0 then return out, 0, nil end
	-- every stream the page walked is in `fresh`: any run of it is a
	-- range of the key with nothing else in it
	local range = #fresh == n
	local chunks = {}
	for at = 1, #fresh, CHUNK do
		local list = {}
		for i = at, math.min(#fresh, at + CHUNK - 1) do list[#list + 1] = fresh[i] end
		chunks[#chunks + 1] = { list = list, range = range }
	end
	local applied, back, nback, walk_rows = 0, {}, 0, nil
	for ci, c in ipairs(chunks) do
		local list = c.list
		local nxt = chunks[ci + 1] or (walk_next and { walk = walk_next })
		local results, total = chunk(def, c, nxt)
		-- what this one read ahead (whether or not it committed: the
		-- events are the same either way)
		local a = pipe.ahead_page
		pipe.ahead_page = nil
		if chunks[ci + 1] then
			chunks[ci + 1].ahead = a and a.page and a
		elseif a then
			walk_rows = a.rows
		end
		if not results then
			-- not committed: the chunk runs as a job, here and now (the
			-- job path's rules for what failed; and an overrun the
			-- master charged to this round - a worker killed in a
			-- chunk - is this message's, no later job's)
			total, results = run_partitions(def, list)
			for _, p in ipairs(list) do
				local r = results[p]
				if r then r.applied = true end
			end
		end
		applied = applied + (total or 0)
		for _, p in ipairs(list) do
			local r = results and results[p]
			-- caught up: read to its end; anything else is the job path's
			if not (r and r.applied and r[1] == "idle") then back[p], nback = true, nback + 1 end
		end
	end
	log("debug", of(def).cp, ("discovery caught up %d of %d new partitions (%d events)"):format(
		#fresh - nback, #fresh, applied))
	if next(back) then
		-- merged back in the page's order (the master queues them so)
		local all = {}
		local j = 1
		for i = 1, #rows - 1 do
			local s = rows[i].stream_id
			if out[j] == s then
				all[#all + 1] = s
				j = j + 1
			elseif back[s] then
				all[#all + 1] = s
			end
		end
		out = all
	end
	return out, applied, walk_rows
end

return M
