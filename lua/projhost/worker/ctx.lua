-- The ctx backend: what a handler's ctx (projhost.projection's) runs on -
-- the batch's own connection, inside its transaction, in pipeline mode,
-- each statement tagged with what caused it so an error is charged to the
-- event that made it; emit; the log lines of a projection (ctx:log, print).
local loader = require "projhost.loader"
local P = require "projhost.projection"
local S = require "projhost.worker.state"
local session = require "projhost.worker.session"
local timers = require "projhost.worker.timers"

local log, errtext = session.log, session.errtext
local of = S.of
local pipe = S.pipe

local M = {}

-- print in a projection: one host log line naming the projection and the
-- event being handled (core.log escapes what could break the line).
loader.log_fn = function(level, msg, path)
	local ctx = S.running and of(S.running).ctx
	local ev = ctx and ctx.event
	local at = path and (path .. ": ") or ""
	log(level, S.running and of(S.running).cp or "worker", at .. tostring(msg), session.event_fields(ev))
end

-- Pipeline mode for the handlers of a batch (design §5): ctx:exec queues
-- its statement without waiting for the round trip; the results are read
-- at the next ctx:query / ctx:emit or at the end of the batch. Every
-- statement queued in pipeline mode carries a tag saying what caused it
-- (conn:send_as, conn:query_as; core/bindings/lua_pg.c keeps them and gives
-- back the failed statement's with its error, however many syncs the batch
-- had), so an error is charged to what caused it: the index of the event
-- (in the job's events) whose handler issued it; a range { lo, hi } of
-- events for a set-based write (ctx:upsert rows of events lo..hi) or for
-- the states stored (transact.state_tag); false for our own statements.
-- Only tagged sends here: a statement sent without a tag comes back as its
-- number, which would pass for an event. first is the first error seen
-- ({ tag, err, code }) - after it the transaction is aborted anyway.
-- Also per batch: async (SET LOCAL synchronous_commit = off was sent),
-- writes (statements the handlers queued), handler_sql (the handlers
-- sent any SQL: their session settings are undone after COMMIT), flush_lo
-- (the first event whose ctx:upsert rows may still be pending), and the
-- page read ahead: ahead (its statement number while pending: its result
-- is found by position at the sync, and a sync in between - ctx:query,
-- ctx:emit - reads and drops it), ahead_size (the size asked for),
-- ahead_page ({ page, events? } once taken, or { rows } for a query read
-- ahead: discovery's next walk page; see take_ahead below).
-- The table is S.pipe (state.lua).

local function pipe_begin()
	pipe.first, pipe.async = nil, false
	pipe.ahead, pipe.ahead_page, pipe.writes = nil, nil, 0
	pipe.handler_sql, pipe.flush_lo = false, 1
	timers.begin()
	pipe.on = S.conn:pipeline(true) and true or false
end

-- the first error of the batch, charged to tag (what conn: gave back)
local function pipe_note(tag, err, code)
	if pipe.first then return end
	pipe.first = { tag = tag, err = err .. " [" .. tostring(code) .. "]", code = code }
end
M.pipe_begin, M.pipe_note = pipe_begin, pipe_note

-- A result read ahead as pipe.ahead_page keeps it (false: it failed or
-- was skipped).
local function ahead_of(r)
	if type(r) == "userdata" then return { page = r } end
	if type(r) == "table" then return { rows = r } end
	return nil
end

-- Sync what is queued and leave pipeline mode. Returns the first error of
-- the batch as { tag, err, code }, or nil.
local function pipe_end()
	local conn = S.conn
	if not pipe.on then return pipe.first end
	local ok, err, code, tag, results
	if pipe.ahead then
		-- not taken (see take_ahead below): the page is among the results
		ok, err, code, tag, results = conn:sync(true)
		if ok then results = err end
		pipe.ahead_page = ahead_of(results and results[pipe.ahead])
		pipe.ahead = nil
	else
		ok, err, code, tag = conn:sync()
	end
	if not ok then pipe_note(tag, err, code) end
	pipe.on, pipe.async = false, false
	if conn:ok() then conn:pipeline(false) end
	return pipe.first
end

-- The page read ahead comes back in one of two ways. A batch that wrote
-- (ctx:exec, ctx:upsert) takes it before its sync and makes its events
-- while the server still runs those writes, the checkpoint and the COMMIT
-- queued after it. A batch that did not (state only: the server has little
-- to do after the read) takes it raw at the sync, and the next batch makes
-- its events after sending its own read-ahead, while the server reads.
-- Measured on make bench: each way is ~40% slower on the other's rows.
local function take_ahead()
	if not pipe.ahead or pipe.writes == 0 then return end
	pipe.ahead = nil
	-- the server gets on with what is queued while the events are made
	S.conn:flush()
	local a = ahead_of(S.conn:take())
	if a and a.page then a.events = a.page:events() end
	pipe.ahead_page = a
end

-- The tags of the statements queued and not read yet, in order (nil when
-- not in pipeline mode).
local function pipe_pending()
	return pipe.on and S.conn:pending() or nil
end
M.pipe_end, M.pipe_pending, M.take_ahead = pipe_end, pipe_pending, take_ahead

local function backend_for(def)
	local rt = of(def)
	local b = {}
	-- tag: what caused the failed statement, as conn: gave it back
	local function note(err, code, tag)
		if not S.failed_sql then S.failed_sql = err .. " [" .. tostring(code) .. "]" end
		if pipe.on then pipe_note(tag, err, code) end
	end
	-- statements queued in the pipeline, tagged with what caused them
	local function send(tag, sql, ...)
		local n, err, code = S.conn:send_as(tag, sql, ...)
		if not n then note(err, code, tag); return nil, err, code end
		pipe.writes = pipe.writes + 1
		return true
	end
	function b.exec(sql, ...)
		pipe.handler_sql = true
		if pipe.on then return send(S.cur > 0 and S.cur or false, sql, ...) end
		local n, err, code = S.conn:exec(sql, ...)
		if not n then note(err, code) end
		return n, err, code
	end
	-- ctx:upsert's set-based write: the rows of events flush_lo..cur (at
	-- the end of the batch: ..the last event), so a failure is narrowed
	-- down to the event that made the row (see settle)
	function b.flush(sql, ...)
		pipe.handler_sql = true
		if pipe.on then
			local hi = S.cur > 0 and S.cur or pipe.flush_hi or pipe.flush_lo
			local ok, err, code = send({ lo = pipe.flush_lo, hi = hi }, sql, ...)
			pipe.flush_lo = hi
			return ok, err, code
		end
		return b.exec(sql, ...)
	end
	-- a sync: the page read ahead, if still queued, went with the results
	function b.query(sql, ...)
		pipe.handler_sql = true
		local rows, err, code, tag = S.conn:query_as(S.cur > 0 and S.cur or false, sql, ...)
		if not rows then note(err, code, tag) end
		pipe.ahead = nil
		return rows, err, code
	end
	function b.emit(stream, etype, data, metadata)
		pipe.handler_sql = true
		local md = {}
		for k, v in pairs(metadata or {}) do md[k] = v end
		-- where an emitted event came from, unless the handler said otherwise
		local ev = b.ctx and b.ctx.event
		if ev then
			if md.causation_id == nil then md.causation_id = ev.id end
			if md.correlation_id == nil then
				md.correlation_id = ev.metadata and ev.metadata.correlation_id or ev.id
			end
		end
		-- also how a projection recognizes its own events (own_events: see projhost.reads)
		if md.projection == nil then md.projection = rt.cp end
		if pipe.async and pipe.on then
			-- others may act on emitted events: this batch waits for its
			-- commit to be on disk after all (see transact.ASYNC_CATCHUP)
			S.conn:send_as(false, "SET LOCAL synchronous_commit = on")
			pipe.async = false
		end
		local ok, body = P.encode({ { type = etype, data = data or {}, metadata = md } })
		if not ok then
			-- ctx:emit checked data and metadata: only what we added is left
			error("ctx:emit: the event cannot be encoded as JSON: " .. errtext(body), 3)
		end
		local rows, err, code, tag = S.conn:query_as(S.cur > 0 and S.cur or false,
			"SELECT projhost.append($1, NULL, $2::jsonb) AS version", stream, body)
		pipe.ahead = nil -- a sync (see b.query)
		if not rows then
			note(err, code, tag)
			return nil, err, code
		end
		return tonumber(rows[1].version)
	end
	-- ctx:schedule, ctx:cancel (worker/timers.lua): on the batch's
	-- pipeline, or at once outside one (the caught_up hook)
	timers.backend(def, b, function(tag, sql, ...)
		if pipe.on then return send(tag, sql, ...) end
		local n, err, code = S.conn:exec(sql, ...)
		if not n then note(err, code) end
		return n, err, code
	end)
	function b.log(level, msg)
		log(level, rt.cp, msg, session.event_fields(b.ctx and b.ctx.event))
	end
	return b
end

local function ctx_for(def)
	local rt = of(def)
	local ctx = rt.ctx
	if not ctx then
		local b = backend_for(def)
		ctx = P.new_ctx(def, b)
		b.ctx = ctx
		rt.ctx = ctx
	end
	return ctx
end
M.ctx_for = ctx_for

return M
