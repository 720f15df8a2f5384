-- The worker process: one PostgreSQL connection and one LuaJIT state holding
-- every loaded projection. The master (core/master.c) sends it jobs over a
-- pipe; each job is one batch in one transaction:
--
--   BEGIN; lock the checkpoint row (FOR UPDATE SKIP LOCKED); load state and
--   checkpoint; read events in gap-free order; run the handlers (their SQL
--   and emits go through the same connection); store state + checkpoint;
--   COMMIT.
--
-- So effects, emitted events, state and checkpoint commit together or not
-- at all, and a crash anywhere (SIGKILL included) rolls the batch back.
local core = require "projhost.core"
local loader = require "projhost.loader"
local P = require "projhost.projection"
local config = require "projhost.config"
local guard = require "projhost.guard"

local json = P.json

local M = {}

-- events per batch (unpartitioned) and per partition (partitioned)
local BATCH = config.get("PROJHOST_BATCH_SIZE")
-- A projection with a large state writes all of it with every batch, so
-- its batches grow with the state: one event per STATE_BYTES_PER_EVENT
-- bytes of (JSON) state, up to BATCH_GROWTH x BATCH. Measured with a
-- 215 KB state: 1,000-event batches spent most of their time encoding,
-- sending and storing the state (make bench, read model rows).
local STATE_BYTES_PER_EVENT = 16
local BATCH_GROWTH = 16
-- A job of partitions reads at most this many events, whatever its size:
-- each of its partitions up to BATCH, fewer when it has more than
-- JOB_EVENTS / BATCH of them, one at least (so a job of PH_GROUP, 1,024,
-- partitions stays within it for a BATCH of 8 or more). The master groups
-- that many so that a catch-up of many small streams pays a job's fixed
-- costs once per 1,024 partitions; a long stream in a large job goes on
-- in the next.
local JOB_EVENTS = 128 * BATCH
-- ...but a page (two are in memory while reading ahead) stays below this
-- many bytes of event data, however large the state
local PAGE_BYTES = 16 * 1024 * 1024
-- runaway SQL (libpq syntax: "30s", "2min", or ms)
local STATEMENT_TIMEOUT = config.get("PROJHOST_STATEMENT_TIMEOUT")
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
-- default error action: retry with exponential backoff, then fail
local DEFAULT_RETRIES = 3

local dsn
local conn
local end_orphan
local defs = {}            -- name -> def
local setup_done = {}      -- name -> true once setup ran on this connection
local db_down = false
local caught = {}          -- "name\tpartition" -> true while caught up
local progress = {}        -- name -> { at = monotime of the last line, n = events since }
-- Runtime state of a definition lives here, never on the definition the
-- loader made: def -> ctx
local ctxs = setmetatable({}, { __mode = "k" })

local function log(level, who, msg)
	core.log(level, who, msg)
end

-- The definition whose job runs (print names it, see below).
local running

-- print in a projection: one host log line naming the projection and the
-- event being handled (core.log escapes what could break the line).
loader.log_fn = function(level, msg, path)
	local ctx = running and ctxs[running]
	local ev = ctx and ctx.event
	local at = ev and ("pos=" .. tostring(ev.position) .. " ") or ""
	if path then at = at .. path .. ": " end
	log(level, running and running.cp or "worker", at .. tostring(msg))
end

-- Our own session settings: set on every new connection, and again after a
-- batch whose handlers sent SQL (see transact).
local SESSION = {
	{ "application_name", "projhost worker" },
	-- event times in one unambiguous form (see to_event)
	{ "TimeZone", "UTC" },
	{ "DateStyle", "ISO" },
	-- our statements are short; JIT compiling one costs more than running it
	{ "jit", "off" },
	{ "statement_timeout", STATEMENT_TIMEOUT },
}

-- ---------------------------------------------------------------------
-- connection

local function drop_conn()
	if conn then conn:close() end
	conn = nil
	setup_done = {}
	for _, def in pairs(defs) do def._ok_at = nil end
end

local reads = require "projhost.reads"
local pg_text_array, COLS = reads.pg_text_array, reads.COLS
-- the session's values of reads.PLANNER, read when the connection opens
local planner_session = {}

local function ensure_conn()
	if conn and conn:ok() then return true end
	drop_conn()
	local c, err = core.connect(dsn)
	if not c then
		-- once per outage, not once per attempt
		if not db_down then
			log("error", "worker", "database unreachable: " .. err .. "; retrying with backoff")
			db_down = true
		end
		return nil, err
	end
	if db_down then log("info", "worker", "database reachable again") end
	db_down = false
	conn = c
	conn:event_fields(reads.EVENT_FIELDS)
	-- the master hands it to the next worker if this one dies (see end_orphan)
	core.beat_backend(conn:pid() or 0)
	for _, kv in ipairs(SESSION) do
		local ok, serr = conn:exec("SELECT set_config($1, $2, false)", kv[1], kv[2])
		if not ok then log("warn", "worker", kv[1] .. " = " .. kv[2] .. ": " .. serr) end
	end
	-- what the reads' planner settings are set back to (projhost.reads)
	local rows = conn:query(reads.SESSION_SQL)
	for i, name in ipairs(reads.PLANNER) do planner_session[i] = rows and rows[1][name] or "on" end
	return true
end

-- Run a statement of our own (not a handler's); errors come back as values.
local function q(sql, ...)
	return conn:query(sql, ...)
end

local function x(sql, ...)
	return conn:exec(sql, ...)
end

local function rollback()
	if conn and conn:ok() and conn:in_transaction() then conn:exec("ROLLBACK") end
end

-- ---------------------------------------------------------------------
-- reading events

-- Prepare the per-definition SQL once (projhost.reads has the text and
-- says why each read is an index range). (def.budget, the seconds its
-- code may run before the master kills the worker, and def.own_events come
-- resolved from the loader.)
local function compile(def)
	def._read_sql, def._read_params = reads.page_sql(def)
	-- committed events we may not read yet because an older transaction is
	-- still running somewhere in the cluster
	def._held_sql, def._held_params = reads.held_sql(def)
end

-- Events come from conn:events (core/bindings/lua_pg.c) as tables with the fields
-- handlers see most (position, version, stream, type); id, tx, data,
-- metadata and time stay in the page's result until first used, and data
-- and metadata stay JSON text until then, so a projection that only counts
-- events never pays for strings or JSON it does not read.
local LAZY = { id = true, tx = true, data = true, metadata = true, time = true }

-- The loader of those fields (see P.event: the event metatable is
-- projection.lua's, protected from scripts).
P.set_lazy(function(e, k)
	if not LAZY[k] then return nil end
	local page = rawget(e, "_page")
	local v = page and page:text(rawget(e, "_row"), k)
	if k == "data" or k == "metadata" then
		v = v and json.decode(v) or {}
	elseif k == "time" and v then
		-- "2026-11-22 22:55:40.123456+00" -> "2026-11-22T22:55:40.123456Z"
		v = v:gsub(" ", "T", 1):gsub("%+00$", "Z")
	end
	return v
end)

local to_event = P.event

-- ---------------------------------------------------------------------
-- the ctx backend: the batch's own connection, inside its transaction

local failed_sql  -- first SQL error seen while running the current event

-- An error value as text, whatever the script raised (a table whose
-- __tostring raises or loops included: see guard.errtext).
local function errtext(v)
	if type(v) == "string" then return v end
	return guard.errtext(v)
end

local function first_line(s)
	return (errtext(s):match("^[^\n]*"))
end

-- Did the current event fail because the database went away (connection
-- lost, server shutting down) rather than because of the event? Then it
-- is not the event's fault: the batch is redone, nothing counted against it.
-- (57014, a statement timeout, is the event's own doing.)
local function db_fault(code)
	if not conn or not conn:ok() then return true end
	return code ~= nil and (code:match("^08") ~= nil or code:match("^57P") ~= nil)
end

-- Pipeline mode for the handlers of a batch (design §5): ctx:exec queues
-- its statement without waiting for the round trip; the results are read
-- at the next ctx:query / ctx:emit or at the end of the batch. sent[i] is
-- the tag of the i-th statement since the last sync, so an error is
-- charged to what caused it: the index of the event (in the job's events)
-- whose handler issued it; a range { lo, hi } of events for a set-based
-- write (ctx:upsert rows of events lo..hi) or for the states stored
-- (state = true); false for our own statements. first is the first error
-- seen ({ tag, err, code }) - after it the transaction is aborted anyway.
-- Also per batch: async (SET LOCAL synchronous_commit = off was sent),
-- writes (statements the handlers queued), handler_sql (the handlers
-- sent any SQL: their session settings are undone after COMMIT), flush_lo
-- (the first event whose ctx:upsert rows may still be pending), and the
-- page read ahead: ahead (its statement index while pending), ahead_size
-- (the size asked for), ahead_page ({ page, events? } once taken; see
-- take_ahead).
local pipe = { on = false, sent = {}, first = nil }

local cur = 0 -- index of the event whose handler runs (0: none)

local function pipe_begin()
	pipe.sent, pipe.first, pipe.async = {}, nil, false
	pipe.ahead, pipe.ahead_page, pipe.writes = nil, nil, 0
	pipe.handler_sql, pipe.flush_lo = false, 1
	pipe.on = conn:pipeline(true) and true or false
end

local function pipe_note(idx, tag, err, code)
	if pipe.first then return end
	if idx and idx <= #pipe.sent then tag = pipe.sent[idx] end
	pipe.first = { tag = tag, err = err .. " [" .. tostring(code) .. "]", code = code }
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
	conn:flush()
	local page = conn:take()
	if type(page) == "userdata" then pipe.ahead_page = { page = page, events = page:events() } end
end

-- The page read ahead by the batch that just ended, if it came back full
-- (a short one could miss events that became readable since).
local function ahead_page()
	local a = pipe.ahead_page
	pipe.ahead_page = nil
	if a and a.page:count() == pipe.ahead_size then return a end
	return nil
end

-- Sync what is queued and leave pipeline mode. Returns the first error of
-- the batch as { tag, err, code }, or nil.
local function pipe_end()
	if not pipe.on then return pipe.first end
	local ok, err, code, idx, results
	if pipe.ahead then
		-- not taken (see take_ahead): the page is among the results
		ok, err, code, idx, results = conn:sync(true)
		if ok then results = err end
		local page = results and results[pipe.ahead]
		if type(page) == "userdata" then pipe.ahead_page = { page = page } end
		pipe.ahead = nil
	else
		ok, err, code, idx = conn:sync()
	end
	if not ok then pipe_note(idx, false, err, code) end
	pipe.on, pipe.async = false, false
	if conn:ok() then conn:pipeline(false) end
	pipe.sent = {}
	return pipe.first
end

-- A handler's ctx:query or ctx:emit synced the pipeline (conn:query): the
-- statement indexes start again, and a page read ahead on conn went with
-- the results.
local function pipe_synced()
	if pipe.on then pipe.sent, pipe.ahead = {}, nil end
end

-- SESSION in one statement (set again after a batch's RESET ALL)
local SESSION_SQL, SESSION_PARAMS
do
	local calls, params = {}, {}
	for i, kv in ipairs(SESSION) do
		calls[i] = ("set_config($%d, $%d, false)"):format(2 * i - 1, 2 * i)
		params[2 * i - 1], params[2 * i] = kv[1], kv[2]
	end
	SESSION_SQL, SESSION_PARAMS = "SELECT " .. table.concat(calls, ", "), params
end

local function backend_for(def)
	local b = {}
	local function note(err, code, idx)
		if not failed_sql then failed_sql = err .. " [" .. tostring(code) .. "]" end
		if pipe.on then pipe_note(idx, cur > 0 and cur or false, err, code) end
	end
	-- statements queued in the pipeline, tagged with what caused them
	local function send(tag, sql, ...)
		local n, err, code = conn:send(sql, ...)
		if not n then note(err, code); return nil, err, code end
		pipe.sent[n] = tag
		pipe.writes = pipe.writes + 1
		return true
	end
	function b.exec(sql, ...)
		pipe.handler_sql = true
		if pipe.on then return send(cur > 0 and cur or false, sql, ...) end
		local n, err, code = conn:exec(sql, ...)
		if not n then note(err, code) end
		return n, err, code
	end
	-- ctx:upsert's set-based write: the rows of events flush_lo..cur (at
	-- the end of the batch: ..the last event), so a failure is narrowed
	-- down to the event that made the row (see settle)
	function b.flush(sql, ...)
		pipe.handler_sql = true
		if pipe.on then
			local hi = cur > 0 and cur or pipe.flush_hi or pipe.flush_lo
			local ok, err, code = send({ lo = pipe.flush_lo, hi = hi }, sql, ...)
			pipe.flush_lo = hi
			return ok, err, code
		end
		return b.exec(sql, ...)
	end
	function b.query(sql, ...)
		pipe.handler_sql = true
		local rows, err, code, idx = conn:query(sql, ...)
		if not rows then note(err, code, idx) end
		pipe_synced()
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
		-- also how a projection recognizes its own events (see OWN)
		if md.projection == nil then md.projection = def.cp end
		if pipe.async and pipe.on then
			-- others may act on emitted events: this batch waits for its
			-- commit to be on disk after all (see ASYNC_CATCHUP)
			conn:send("SET LOCAL synchronous_commit = on")
			pipe.async = false
		end
		local ok, body = P.encode({ { type = etype, data = data or {}, metadata = md } })
		if not ok then
			-- ctx:emit checked data and metadata: only what we added is left
			error("ctx:emit: the event cannot be encoded as JSON: " .. errtext(body), 3)
		end
		local rows, err, code, idx = conn:query("SELECT projhost.append($1, NULL, $2::jsonb) AS version",
			stream, body)
		pipe_synced()
		if not rows then
			note(err, code, idx)
			return nil, err, code
		end
		return tonumber(rows[1].version)
	end
	function b.log(level, msg)
		local ev = b.ctx and b.ctx.event
		log(level, def.cp, ev and ("pos=" .. ev.position .. " " .. msg) or msg)
	end
	return b
end

local function ctx_for(def)
	local ctx = ctxs[def]
	if not ctx then
		local b = backend_for(def)
		ctx = P.new_ctx(def, b)
		b.ctx = ctx
		ctxs[def] = ctx
	end
	return ctx
end

-- ---------------------------------------------------------------------
-- error actions

local ACTIONS = { retry = true, skip = true, park = true, fail = true, stop = true }

local function default_action(attempt)
	if attempt <= DEFAULT_RETRIES then return "retry", 0.5 * 2 ^ (attempt - 1) end
	return "fail"
end

-- Events whose code overran its budget or killed its worker (the master
-- tells the next job): projection -> { [position] = { kind, reason } }.
-- kind "on_error" or "caught_up": that hook is not called again for it;
-- any other kind (handler, init, sql): the event fails without running.
local overrun = {}
local out_of_memory = false

local function overrun_at(def, position, kinds)
	local o = overrun[def.cp]
	local v = o and o[position]
	if v == nil then return nil end
	if type(v) ~= "table" then
		v = { kind = "handler", reason = ("overran its budget of %gs and was killed"):format(tonumber(v) or 0) }
	end
	if kinds and not kinds[v.kind or "handler"] then return nil end
	return v
end

local function overrun_clear(def, position)
	local o = overrun[def.cp]
	if o then o[position] = nil end
end

local HOOKS = { on_error = true, caught_up = true }
local NOT_HOOKS = { handler = true, init = true }
local SQL = { sql = true }

-- A worker died while the handlers' queued statements ran (kind sql): which
-- of them was too slow is not known, so the job runs them one at a time,
-- each under its own event's beat - the next overrun names the event.
local function serial(def, events)
	local o = overrun[def.cp]
	if not o or not next(o) then return false end
	for _, e in ipairs(events or {}) do
		if overrun_at(def, e.position, SQL) then return true end
	end
	return events == nil
end

-- Ask the projection's on_error what to do; fall back to the default when
-- it is missing, fails, overruns its budget or answers nonsense (and say so).
local function decide(def, err, e, attempt)
	if not def.on_error then return default_action(attempt) end
	-- which event, as every log line about one says
	local at = ("pos=%s %s: "):format(tostring(e.position), def.file)
	local o = overrun_at(def, e.position, HOOKS)
	if o then
		overrun_clear(def, e.position)
		log("error", def.cp, at .. "on_error " .. tostring(o.reason) .. "; using the default action")
		return default_action(attempt)
	end
	core.beat(e.position, "on_error")
	local ok, action, delay = guard.call(def.budget, def.on_error, err, e, attempt)
	core.beat()
	if not ok then
		log("error", def.cp, at .. "on_error itself failed (" .. first_line(action) .. "); using the default action")
		return default_action(attempt)
	end
	if type(action) ~= "string" or not ACTIONS[action] then
		log("error", def.cp, at .. "on_error returned " .. (type(action) == "string" and action or type(action)) ..
			", expected retry|skip|park|fail|stop; using the default action")
		return default_action(attempt)
	end
	if action == "retry" then
		local d = tonumber(delay)
		-- a delay that is not a finite number is no delay we can wait for
		if not d or d ~= d or d == math.huge or d == -math.huge then d = 0.5 * 2 ^ (attempt - 1) end
		delay = math.min(math.max(d, 0), 86400)
	end
	return action, delay
end

-- ---------------------------------------------------------------------
-- checkpoints, setup, reset

-- A worker that died (killed past its budget, mostly) may have left its
-- backend running a statement of the batch - a pg_sleep after SET LOCAL
-- statement_timeout = 0 - that still holds the batch's row locks: end it
-- before the batch runs again. Only a backend of a projhost worker, and
-- never our own.
function end_orphan(pid)
	if not pid or pid <= 0 or not ensure_conn() then return end
	local rows = q([[SELECT pg_terminate_backend(pid, 5000) AS ended FROM pg_stat_activity
		WHERE pid = $1 AND application_name = 'projhost worker' AND pid <> pg_backend_pid()]], pid)
	if rows and rows[1] then log("info", "worker", "ended backend " .. pid .. " of the worker that died") end
end

local function lock_checkpoint(def, part)
	local rows, err, code = q([[SELECT version, state::text AS state, last_tx::text AS last_tx,
		last_pos, status FROM projhost.checkpoints
		WHERE projection = $1 AND partition = $2 FOR UPDATE SKIP LOCKED]], def.cp, part)
	if not rows then return nil, err, code end
	return rows[1] or false
end

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

-- How many events the next batch of an unpartitioned projection reads,
-- after a state of state_len bytes, with events of event_len bytes on
-- average (see STATE_BYTES_PER_EVENT and PAGE_BYTES).
local function batch_for(state_len, event_len)
	local n = math.ceil(state_len / STATE_BYTES_PER_EVENT / BATCH) * BATCH
	n = math.min(n, math.floor(PAGE_BYTES / math.max(event_len, 1) / BATCH) * BATCH)
	return math.max(BATCH, math.min(BATCH * BATCH_GROWTH, n))
end

-- setup SQL and the projection's own checkpoint row, once per connection.
-- Each setup string runs with the simple query protocol, so it may hold
-- several statements.
local function ensure_setup(def)
	if setup_done[def.cp] then return true end
	local ok, err, code = x([[INSERT INTO projhost.checkpoints (projection, partition, version)
		VALUES ($1, '', $2) ON CONFLICT DO NOTHING]], def.cp, def.version)
	if not ok then return nil, err, code end
	if #def.setup > 0 then
		x("BEGIN")
		-- two workers creating the same table at once would collide
		x("SELECT pg_advisory_xact_lock(hashtext('projhost.setup'))")
		for i, sql in ipairs(def.setup) do
			ok, err, code = conn:exec(sql)
			if not ok then
				rollback()
				return nil, "setup statement " .. i .. " failed: " .. err, code, true
			end
		end
		ok, err, code = x("COMMIT")
		if not ok then return nil, err, code end
	end
	setup_done[def.cp] = true
	return true
end

local function set_status(def, part, status, msg)
	x([[UPDATE projhost.checkpoints SET status = $3, error = $4, updated_at = now()
		WHERE projection = $1 AND partition = $2]], def.cp, part, status, msg)
end

local db_failures = 0

local function backoff()
	db_failures = db_failures + 1
	return math.min(0.25 * 2 ^ (db_failures - 1), 30)
end

-- Our own statement failed (connection lost, deadlock, server restart):
-- the batch rolled back; the master runs it again after a growing delay.
local function dberror(def, err, code)
	rollback()
	if conn and not conn:ok() then drop_conn() end
	if db_failures == 0 or not db_down then
		log("warn", def.cp, "batch rolled back: " .. errtext(err) .. (code and (" [" .. code .. "]") or ""))
	end
	return backoff()
end

-- Version changed (or `projhost reset` set it to 0): run the reset SQL,
-- forget every state and checkpoint of the projection, start over. Runs
-- in its own transaction under the projection's exclusive advisory lock,
-- which batches of partitioned projections hold shared.
local function reset_projection(def)
	local ok, err, code = x("BEGIN")
	if ok then ok, err, code = x("SELECT pg_advisory_xact_lock(hashtext('projhost:' || $1))", def.cp) end
	local rows
	if ok then
		rows, err, code = q([[SELECT version FROM projhost.checkpoints
			WHERE projection = $1 AND partition = '' FOR UPDATE]], def.cp)
		ok = rows
	end
	if not ok then return nil, err, code end
	local old = rows[1] and tonumber(rows[1].version)
	if old == def.version then return x("COMMIT") end -- another worker did it
	for i, sql in ipairs(def.reset) do
		ok, err, code = conn:exec(sql)
		if not ok then
			rollback()
			return nil, "reset statement " .. i .. " failed: " .. err, code, true
		end
	end
	ok, err, code = x("DELETE FROM projhost.checkpoints WHERE projection = $1 AND partition <> ''", def.cp)
	if ok then
		ok, err, code = x([[UPDATE projhost.checkpoints SET version = $2, state = NULL, last_tx = '0',
			last_pos = 0, status = 'running', error = NULL, updated_at = now()
			WHERE projection = $1 AND partition = '']], def.cp, def.version)
	end
	if ok then ok, err, code = x("COMMIT") end
	if not ok then return nil, err, code end
	for k in pairs(caught) do
		if k:sub(1, #def.cp + 1) == def.cp .. "\t" then caught[k] = nil end
	end
	log("info", def.cp, string.format("version %s -> %d: reset, rebuilding from the start",
		tostring(old), def.version))
	return true
end

local retry_parked

-- Set when the master's list of projections is out of date (a shadow was
-- switched over, a definition must be registered as a shadow): the reply
-- then carries a "relist" line and the master reloads every worker.
local relist = false

-- Another worker switched the shadow def over: serve it under its name.
local function adopt_promoted(def)
	defs[def.cp] = nil
	def.cp, def.shadow_of = def.shadow_of, nil
	defs[def.cp] = def
	setup_done[def.cp] = true
	for k in pairs(caught) do
		if k:sub(1, #def.cp + 1) == def.cp .. "\t" then caught[k] = nil end
	end
	relist = true
end

-- The shadow def caught up: in one transaction, drop the serving
-- version's state and checkpoints and give the shadow's rows its name.
-- Batches of the old version in flight finish first (their locks).
local function promote(def)
	local name, shadow = def.shadow_of, def.cp
	local ok, err, code = x("BEGIN")
	if ok then ok, err, code = x("SELECT pg_advisory_xact_lock(hashtext('projhost:' || $1))", name) end
	if ok then ok, err, code = x("SELECT pg_advisory_xact_lock(hashtext('projhost:' || $1))", shadow) end
	if ok then
		ok, err, code = q([[SELECT 1 FROM projhost.checkpoints WHERE projection = $1 AND partition = ''
			FOR UPDATE]], name)
	end
	if ok then ok, err, code = x("DELETE FROM projhost.checkpoints WHERE projection = $1", name) end
	if ok then
		ok, err, code = x("UPDATE projhost.checkpoints SET projection = $1 WHERE projection = $2", name, shadow)
	end
	if ok then
		ok, err, code = x("UPDATE projhost.parked SET projection = $1 WHERE projection = $2", name, shadow)
	end
	if ok then ok, err, code = x("COMMIT") end
	if not ok then return nil, err, code end
	log("info", name, string.format("version %d caught up in the shadow: switched over", def.version))
	adopt_promoted(def)
	return true
end

-- setup or reset SQL failed: the projection's own SQL is wrong (it fails
-- until the file is fixed), unless the database itself was the problem.
-- Logged once per load (def), reload or resume: until then every job of
-- the projection answers "failed" without trying again.
local setup_failed = setmetatable({}, { __mode = "k" }) -- def -> true

local function script_failed(def, err, code, is_script)
	if not is_script then return "dberror", dberror(def, err, code) end
	log("error", def.cp, def.file .. ": " .. err)
	set_status(def, "", "failed", err)
	setup_failed[def] = true
	return "failed", 0
end

-- Connect, run setup, check the projection's own row: the part every
-- job starts with. Returns true, or status, delay for the whole job.
local function prepare(def)
	if not ensure_conn() then return "dberror", backoff() end
	local ok, err, code, is_setup
	local rows
	if def.shadow_of then
		-- switched over meanwhile by another worker or instance?
		rows = q("SELECT version FROM projhost.checkpoints WHERE projection = $1 AND partition = ''",
			def.shadow_of)
		if rows and rows[1] and tonumber(rows[1].version) == def.version then
			adopt_promoted(def)
			return "idle", 0
		end
	end
	if setup_failed[def] then
		-- still failed, or resumed by an operator (then try again)
		rows = q("SELECT status FROM projhost.checkpoints WHERE projection = $1 AND partition = ''", def.cp)
		if rows and rows[1] and rows[1].status == "failed" then return "failed", 0 end
		setup_failed[def] = nil
	end
	ok, err, code, is_setup = ensure_setup(def)
	if not ok then return script_failed(def, err, code, is_setup) end
	rows, err, code = q([[SELECT version, status FROM projhost.checkpoints
		WHERE projection = $1 AND partition = '']], def.cp)
	if not rows then return "dberror", dberror(def, err, code) end
	local row = rows[1]
	if not row then setup_done[def.cp] = nil; return "more", 0 end
	local stored = tonumber(row.version)
	if stored ~= def.version then
		local newer = defs[def.cp .. "@" .. stored]
		if newer and newer.shadow_of == def.cp then
			-- our shadow was switched over elsewhere: serve it
			adopt_promoted(newer)
			return "more", 0
		end
		if stored ~= 0 and def.rebuild == "shadow" then
			-- new code that must rebuild in the shadow: re-register
			relist = true
			return "retry", 0.2
		end
		if stored > def.version then
			-- another host already runs a newer version: do not reset it back
			log("warn", def.cp, string.format("stored version %d is newer than %s (version %d); not touching it",
				stored, def.file, def.version))
			return "retry", 5
		end
		ok, err, code, is_setup = reset_projection(def)
		if not ok then return script_failed(def, err, code, is_setup) end
		return true, "reset"
	end
	if row.status ~= "running" then return row.status, 0 end
	retry_parked(def)
	return true
end

-- ---------------------------------------------------------------------
-- running handlers

-- One progress line per projection per second at most, so a catch-up of
-- millions of events does not flood the log and a live event still shows.
local function report(def, n, where, force)
	local p = progress[def.cp]
	if not p then p = { at = 0, n = 0 }; progress[def.cp] = p end
	p.n = p.n + n
	local now = core.monotime()
	if p.n > 0 and (force or now - p.at >= 1) then
		log("info", def.cp, string.format("%sapplied %d event%s", where, p.n, p.n == 1 and "" or "s"))
		p.at, p.n = now, 0
	end
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
-- costs more than a counting handler itself); cur says which event was
-- running when an error escaped. core.beat tells the master's watchdog
-- which event is running since when.
local function apply_range(def, state, events, ctx, i0, i1)
	local papply, beat = P.apply, core.beat
	local ahead = pipe.ahead
	for i = i0, i1 do
		local e = events[i]
		cur = i
		-- the page read ahead arrives meanwhile (see conn:consume)
		if ahead and i % 256 == 0 then conn:consume() end
		ctx.event = e
		failed_sql = nil
		beat(e.position)
		state = papply(def, state, e, ctx)
		if failed_sql then
			-- the handler caught a failed statement and went on, but the
			-- transaction is aborted: the event failed
			error("SQL error (caught by the handler): " .. failed_sql, 0)
		end
	end
	return state
end

-- Every group of the job: { state, i0, i1 } -> g.out, the state after it.
local function apply_groups(def, job, ctx)
	local events = job.events
	for _, g in ipairs(job.groups) do
		local state = g.state
		if g.i1 >= g.i0 then
			-- init for a new partition is charged to its first event
			cur = g.i0
			if state == nil then state = init_state(def, events[g.i0].position) end
			state = apply_range(def, state, events, ctx, g.i0, g.i1)
		end
		-- nil: a partition that had only events of other types and no
		-- state yet keeps none (see store_parts)
		g.out = state
	end
	core.beat()
	cur = 0
	ctx.event = nil
	return true
end

local visible = P.sees_type

-- ---------------------------------------------------------------------
-- the batch transaction, written once for every kind of batch
--
-- A job is one transaction over events of one projection, in the order
-- they are applied: job.events (each with .index), job.groups (one per
-- partition: { part, state, i0, i1, ... }; an unpartitioned projection
-- has one group, partition ""). Its kind supplies two functions:
--   open(job)  BEGIN, lock the checkpoint rows, read the events and the
--              states (in pipeline mode); returns true | status, delay
--   store(job, states) queue the states and checkpoints (tag them with
--              STATE_TAG) - COMMIT follows
-- transact() runs the rest: apply, flush ctx:upsert rows, store, COMMIT,
-- and says what failed: nil (committed), or { lo, hi, err } - the first
-- failure lies in events lo..hi (lo == hi: that event) - or a status.
-- settle() then finds the event that fails by itself after every event
-- before it committed, and error_action gives it its action.

local function outcome_of(job, fail_i, fail_err)
	-- the handlers' statements still queued run under the budget too: the
	-- watchdog charges an overrun to the first event that sent one
	local first_sent
	for _, tag in pairs(pipe.sent) do
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
	if not conn:ok() then return { status = "dberror", err = "connection lost" } end
	return nil
end

local function transact(def, job)
	local ctx = ctx_for(def)
	ctx._discard()
	failed_sql = nil
	local events, n = job.events, #job.events
	for i = 1, next(overrun[def.cp] or {}) and n or 0 do
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
	local ok, err = xpcall(apply_groups, traceback, def, job, ctx)
	if one_by_one and conn:ok() then pipe.on = conn:pipeline(true) and true or false end
	if not ok then
		core.beat()
		ctx.event = nil
		fail_i, fail_err = cur, err
		if fail_i == 0 then fail_i = 1 end
		if is_memory(err) then
			-- drop what the handler built before anything else runs
			-- (with no allocation: a new key, even for nil, may need one)
			for _, g in ipairs(job.groups) do
				if g.state ~= nil then g.state = nil end
				if g.out ~= nil then g.out = nil end
			end
			collectgarbage("collect")
			out_of_memory = true
			fail_err = def.file .. ": not enough memory"
		end
		cur = 0
	end
	if not fail_i then
		pipe.flush_hi = n
		local okf, ferr = ctx._flush()
		pipe.flush_hi = nil
		-- rows that cannot even be encoded: the events since the last flush
		if not okf then return outcome_of(job) or { lo = pipe.flush_lo, hi = n, err = ferr } end
	end
	if not fail_i then
		local states = {}
		for i, g in ipairs(job.groups) do
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
			conn:send("SELECT set_config('statement_timeout', $1, true)", STATEMENT_TIMEOUT)
		end
		job.store(job, states)
		conn:send("COMMIT")
		if pipe.handler_sql then
			-- its session settings (SET without LOCAL) stay with the
			-- connection: undo them, so they never reach another
			-- projection's statements
			conn:send("RESET ALL")
			conn:send(SESSION_SQL, unpack(SESSION_PARAMS))
		end
		if job.after_commit then job.after_commit(job) end
	end
	local o = outcome_of(job, fail_i, fail_err)
	if o then rollback() end
	return o
end

-- A tag for the statement that stores a job's states: a failure there is
-- one of events 1..n (see outcome_of).
local function state_tag(job)
	return { lo = 1, hi = math.max(1, #job.events), state = true }
end

-- The error action for event e of partition part, after everything before
-- it has been committed: its checkpoint is where `prev` says (a check: if
-- another worker or instance moved it meanwhile, nothing is done and the
-- job runs again). The attempt count lives in the checkpoint row, so it
-- survives worker restarts and is shared by every worker and instance.
-- Returns status, delay.
local function error_action(def, part, e, err, prev)
	local where = string.format("pos=%d event %s@%d (%s)", e.position, e.stream, e.version, e.type)
	if not ensure_conn() then return "dberror", backoff() end
	local ok, xerr, xcode = x("BEGIN")
	local row
	if ok and part ~= "" then
		-- a new partition's row was made by the batch that rolled back
		ok, xerr, xcode = x([[INSERT INTO projhost.checkpoints (projection, partition, version)
			VALUES ($1, $2, $3) ON CONFLICT DO NOTHING]], def.cp, part, def.version)
	end
	if ok then
		row, xerr, xcode = lock_checkpoint(def, part)
		ok = row
	end
	if ok == nil then return "dberror", dberror(def, xerr, xcode) end
	if row == false then rollback(); return "locked", 0 end
	if row.status ~= "running" then rollback(); return row.status, 0 end
	if prev and (tonumber(row.last_pos) ~= prev.pos or (prev.tx and row.last_tx ~= prev.tx)) then
		rollback()
		return "more", 0
	end
	local rows
	rows, xerr, xcode = q([[UPDATE projhost.checkpoints
		SET attempts = CASE WHEN retry_pos = $3 THEN attempts + 1 ELSE 1 END,
			retry_pos = $3, error = $4, updated_at = now()
		WHERE projection = $1 AND partition = $2 RETURNING attempts]],
		def.cp, part, e.position, where .. ": " .. first_line(err))
	if not rows then return "dberror", dberror(def, xerr, xcode) end
	local attempt = tonumber(rows[1].attempts)
	local action, delay = decide(def, err, e, attempt)
	log("error", def.cp, string.format("%s failed (attempt %d): %s -> %s%s", where, attempt,
		first_line(err), action, action == "retry" and string.format(" in %.2fs", delay) or ""))
	local status = "more"
	ok = true
	if action == "retry" then
		status = "retry"
	elseif action == "skip" or action == "park" then
		-- move past the event; unpartitioned checkpoints are (tx, position),
		-- partitioned ones the stream version
		if part == "" then
			ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET last_tx = $3::xid8, last_pos = $4,
				error = NULL, updated_at = now() WHERE projection = $1 AND partition = $2]],
				def.cp, part, e.tx, e.position)
		else
			ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET last_pos = $3,
				error = NULL, updated_at = now() WHERE projection = $1 AND partition = $2]],
				def.cp, part, e.version)
		end
		if ok and action == "park" then
			ok, xerr, xcode = x([[INSERT INTO projhost.parked (projection, partition, global_position,
				event_id, stream_id, stream_version, event_type, error, attempts)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)]], def.cp, part, e.position, e.id,
				e.stream, e.version, e.type, first_line(err), attempt)
		end
	elseif action == "fail" then
		status = "failed"
		ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET status = 'failed', updated_at = now()
			WHERE projection = $1 AND partition = $2]], def.cp, part)
	else
		-- stop: the whole projection, whatever the partition
		status = "stopped"
		ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET status = 'stopped', error = $2, updated_at = now()
			WHERE projection = $1 AND partition = '']], def.cp, where .. ": " .. first_line(err))
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
		-- the stream version
		if plan.kind == "parts" then
			start[e.partition] = { pos = e.version }
		else
			start[e.partition] = { tx = e.tx, pos = e.position }
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

-- ---------------------------------------------------------------------
-- unpartitioned projections: read in (transaction_id, global_position)
-- order below the xmin horizon (design §2)

local caught_up_partitioned

-- Open a job over the next page. plan (on the failure path): read
-- exactly its events, from its start, without reading ahead.
local function open_page(def, job, plan)
	local limit = plan and #plan.events
	pipe_begin()
	if not pipe.on then return "dberror", dberror(def, "cannot enter pipeline mode") end
	local rp, hp = def._read_params, def._held_params
	local want = limit or def._batch or BATCH
	-- The read goes out with the checkpoint this worker committed last
	-- (a guess checked against the locked row below): one round trip in
	-- the common case, with a plan made for the real values.
	-- The state too: it is what this worker committed with that
	-- checkpoint, so a hit saves fetching and decoding it (a large state
	-- is most of a batch's cost). Taken out now, put back after COMMIT:
	-- handlers mutate it, and a failed batch must not leave it dirty.
	local guess = def._last
	def._last = nil
	if plan then guess = nil end
	conn:send("BEGIN")
	-- xmin tells whether anyone (a parked retry, another instance, an
	-- operator) wrote the row since our last commit
	conn:send_query([[SELECT version, CASE WHEN $2 THEN state::text END AS state, last_tx::text AS last_tx,
		last_pos, status, xmin::text AS rx, xid(pg_current_xact_id())::text AS my_xid
		FROM projhost.checkpoints WHERE projection = $1 AND partition = ''
		FOR UPDATE SKIP LOCKED]], def.cp, guess == nil)
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
		conn:send_events(def._read_sql, guess.tx, guess.pos, want, unpack(rp, 1, #rp))
	else
		conn:send("SELECT 1")
	end
	conn:send_query(def._held_sql, unpack(hp, 1, #hp))
	local ok, res, code = conn:sync(true)
	if not ok then
		pipe.on = false
		if conn:ok() then conn:pipeline(false) end
		return "dberror", dberror(def, res, code)
	end
	local row, rows, held = res[2][1], res[4], #res[5] > 0
	local hit = row and guess and guess.rx == row.rx and guess.tx == row.last_tx
		and guess.pos == tonumber(row.last_pos)
	if row and plan and (row.last_tx ~= plan.start[""].tx or tonumber(row.last_pos) ~= plan.start[""].pos) then
		-- moved by another worker or instance since the plan was read
		pipe_end()
		rollback()
		return "more", 0
	end
	if row and not hit then
		want, ahead = limit or def._batch or BATCH, nil
		-- another worker or instance moved it, or our first batch
		local err2
		rows, err2, code = conn:events(def._read_sql, row.last_tx, tonumber(row.last_pos), want,
			unpack(rp, 1, #rp))
		local srows = rows and guess and conn:query([[SELECT state::text AS state FROM projhost.checkpoints
			WHERE projection = $1 AND partition = '']], def.cp)
		if srows then row.state = srows[1] and srows[1].state end
		if not rows or (guess and not srows) then
			pipe_end()
			return "dberror", dberror(def, err2 or "reading the state failed", code)
		end
		pipe.sent = {}
	end
	if not row or row.status ~= "running" or tonumber(row.version) ~= def.version then
		pipe_end()
		rollback()
		def._ok_at = nil -- look properly next time (row gone, paused, new version)
		if not row then
			setup_done[def.cp] = nil
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

	pipe.sent = {}
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
		local size = def._batch or BATCH
		local idx = conn:send_page(def._read_sql, tx, pos, size, unpack(rp, 1, #rp))
		if idx then
			pipe.sent[idx] = false
			pipe.ahead, pipe.ahead_size = idx, size
			-- a full page: more events are waiting, this batch is in the
			-- middle of a catch-up (see ASYNC_CATCHUP)
			if ASYNC_CATCHUP then
				idx = conn:send("SET LOCAL synchronous_commit = off")
				if idx then pipe.sent[idx], pipe.async = false, true end
			end
			conn:flush()
		end
	end
	local idx = conn:send(reads.RESTORE_SQL, unpack(planner_session))
	if idx then pipe.sent[idx] = false end
	if ahead then rows = ahead.events or ahead.page:events() end

	local events = rows
	for i = 1, #events do
		local e = to_event(events[i])
		e.index, e.partition = i, ""
	end
	if plan and not same_events(plan, events) then return "more", 0 end
	job.events, job.row, job.want, job.held, job.limit = events, row, want, held, limit
	job.groups = { { part = "", state = state, i0 = 1, i1 = #events } }
	job.start = { [""] = { tx = row.last_tx, pos = tonumber(row.last_pos) } }
	return true
end

local function store_page(job, states)
	local n = #job.events
	if n == 0 then return end
	local def, last = job.def, job.events[n]
	local page = last._page
	def._batch = batch_for(#states[1], page and page:bytes() / page:count() or 0)
	local idx = conn:send([[UPDATE projhost.checkpoints SET state = $2::jsonb, last_tx = $3::xid8,
		last_pos = $4, script_hash = $5, error = NULL, updated_at = now()
		WHERE projection = $1 AND partition = '']],
		def.cp, states[1], last.tx, last.position, def.hash)
	if idx then pipe.sent[idx] = state_tag(job) end
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

-- The caught_up hook, in a transaction of its own after the batch that
-- caught up committed (a failing hook never undoes a batch): its failure
-- is logged and shown in status, and it runs again at the next catch-up.
local function run_caught_up(def)
	if not def.caught_up then return true end
	local ctx = ctx_for(def)
	local o = overrun_at(def, 0, HOOKS)
	local ok, err
	if o then
		overrun_clear(def, 0)
		ok, err = false, "caught_up " .. tostring(o.reason)
	else
		if not x("BEGIN") then return false end
		failed_sql = nil
		ctx._discard()
		core.beat(0, "caught_up")
		ok, err = guard.call(def.budget, def.caught_up, ctx)
		core.beat()
		if ok then ok, err = ctx._flush() end
		if ok and failed_sql then ok, err = false, "SQL error (caught by the hook): " .. failed_sql end
		if ok then ok, err = x("COMMIT") end
		if not ok then rollback() end
		-- what the hook SET stays with the connection otherwise (see transact)
		if conn and conn:ok() then
			x("RESET ALL")
			x(SESSION_SQL, unpack(SESSION_PARAMS))
		end
	end
	if not ok then
		local msg = "caught_up failed: " .. first_line(err)
		log("error", def.cp, def.file .. ": " .. msg)
		x([[UPDATE projhost.checkpoints SET error = $2, updated_at = now()
			WHERE projection = $1 AND partition = '']], def.cp, msg)
		return false
	end
	return true
end

-- Returns status, count, delay (statuses: see core/master.c).
-- Two round trips: [BEGIN, lock the checkpoint row, read, held-back check],
-- then [the handlers' statements, checkpoint, COMMIT].
local function run_batch(def)
	running = def
	-- the full check (setup, version, status, shadows, parked retries) at
	-- most once a second; the locked row is checked on every batch anyway
	local now = core.monotime()
	if def.shadow_of or not def._ok_at or now - def._ok_at > 1 then
		local ready, why = prepare(def)
		if ready ~= true then return ready, 0, why end
		def._ok_at = now
	elseif not ensure_conn() then
		return "dberror", 0, backoff()
	end

	local job = { def = def, store = store_page, after_commit = take_ahead }
	local st, d = open_page(def, job)
	if st ~= true then return st, 0, d end
	local o = transact(def, job)
	local events, n = job.events, #job.events
	if o then
		def._last = nil
		if o.status == "dberror" then return "dberror", 0, dberror(def, first_line(o.err), o.code) end
		local plan = { kind = "page", events = events, start = job.start }
		local status, delay, committed = settle(def, plan, o, attempt_page(def))
		if status == "dberror" then delay = dberror(def, "the batch's database work failed") end
		report(def, committed, "", false)
		return status, committed, delay
	end
	db_failures = 0
	local row = job.row
	local last_pos = n > 0 and events[n].position or tonumber(row.last_pos)
	def._last = { tx = n > 0 and events[n].tx or row.last_tx, pos = last_pos, state = job.groups[1].out,
		rx = n > 0 and row.my_xid or row.rx, ahead = ahead_page() }
	local status, key = "more", def.cp .. "\t"
	if n < job.want then status = job.held and "held" or "idle" end
	if n == job.want then caught[key] = nil end
	report(def, n, string.format("pos=%d ", last_pos), status == "idle" and not caught[key])
	if status == "idle" and not caught[key] then
		caught[key] = true
		log("info", def.cp, string.format("pos=%d caught up", last_pos))
		run_caught_up(def)
		-- what the hook wrote is not ours to guess
		def._last = nil
	end
	if status == "idle" and def.shadow_of then
		local okp, err, pcode = promote(def)
		if not okp then return "dberror", n, dberror(def, err, pcode) end
		return "idle", n, 0
	end
	return status, n, 0
end

-- ---------------------------------------------------------------------
-- parked retries: `projhost parked retry` flagged parked events of def:
-- run each again, in its own transaction under its partition's lock,
-- against the partition's current state. Success removes it from the dead
-- letters; failure parks it again with the new error. Checked at most once
-- a second per projection.

local parked_checked = {}

local function load_event(position)
	local rows, err, code = conn:events("SELECT " .. COLS .. " FROM projhost.events WHERE global_position = $1",
		position)
	if not rows then return nil, err, code end
	return rows[1] and to_event(rows[1]) or false
end

local function store_parked(job, states)
	local idx = conn:send([[UPDATE projhost.checkpoints SET state = $3::jsonb, updated_at = now()
		WHERE projection = $1 AND partition = $2]], job.def.cp, job.groups[1].part, states[1])
	if idx then pipe.sent[idx] = state_tag(job) end
end

function retry_parked(def)
	local now = core.monotime()
	if now - (parked_checked[def.cp] or 0) < 1 then return end
	parked_checked[def.cp] = now
	local list = q([[SELECT id, partition, global_position FROM projhost.parked
		WHERE projection = $1 AND retry_requested ORDER BY global_position LIMIT 100]], def.cp)
	if not list or #list == 0 then return end
	for _, p in ipairs(list) do
		local ok = x("BEGIN")
		local row = ok and lock_checkpoint(def, p.partition)
		local claimed = row and q([[DELETE FROM projhost.parked WHERE id = $1 AND retry_requested
			RETURNING id]], p.id)
		local e = claimed and #claimed == 1 and load_event(p.global_position)
		if not e then
			rollback() -- partition busy, claimed by another worker, or the event is gone
		else
			e.index, e.partition = 1, p.partition
			local state = row.state and json.decode(row.state)
			local job = { def = def, store = store_parked, events = { e },
				groups = { { part = p.partition, state = state, i0 = 1, i1 = 1 } } }
			pipe_begin()
			local o = transact(def, job)
			if not o then
				log("info", def.cp, string.format("pos=%d parked event applied on retry", e.position))
				-- the partition's state changed under the worker's cache
				def._last = nil
			else
				rollback()
				local msg = first_line(o.err or o.status)
				log("error", def.cp, string.format("pos=%d parked event failed again: %s", e.position, msg))
				x([[UPDATE projhost.parked SET retry_requested = false, attempts = attempts + 1,
					error = $2, parked_at = now() WHERE id = $1]], p.id, msg)
			end
		end
	end
end

-- ---------------------------------------------------------------------
-- partitioned projections: one state and checkpoint (stream_version) per
-- stream; many partitions per transaction

local stream_in_source = P.reads_stream

-- Checkpoint rows this worker created. A new partitioned projection over
-- many streams grows projhost.checkpoints from nothing to a row per stream
-- in minutes, faster than autovacuum analyzes it, and with the statistics
-- of an empty table the planner scans the whole table for every job (make
-- bench: 1 worker 10x slower on a fresh database). So the worker analyzes
-- it itself each time its count doubles: a dozen times for a million.
local new_checkpoints, analyze_at = 0, 1000

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
-- Open a job over partitions `wanted` (sorted). plan (the failure path):
-- exactly its events, each partition from its start and up to (not
-- including) its first event that is not in the plan.
local function open_parts(def, job, wanted, plan)
	local stop_at
	if plan then
		stop_at = {}
		for _, e in ipairs(plan.events) do stop_at[e.partition] = e.version + 1 end
		local nx = plan.next
		if nx then stop_at[nx.partition] = nx.version end
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
	conn:send("SELECT pg_advisory_xact_lock_shared(hashtext('projhost:' || $1))", def.cp)
	conn:send(reads.PLANNER_SQL)
	local per = math.max(1, math.min(BATCH, math.floor(JOB_EVENTS / #wanted)))
	conn:send_events(reads.PARTS_SQL, def.cp, pg_text_array(wanted), per, not def.own_events, def.name)
	local ok, res, code = conn:sync(true)
	if not ok then
		pipe.on = false
		if conn:ok() then conn:pipeline(false) end
		return "dberror", dberror(def, res, code)
	end
	local evrows = res[4]
	pipe.sent = {}
	local ri = conn:send(reads.RESTORE_SQL, unpack(planner_session))
	if ri then pipe.sent[ri] = false end

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
			results[p] = { r.status, 0 }
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
		if last > g.start or g.i1 >= g.i0 then
			g.state = cp.state and json.decode(cp.state)
			groups[#groups + 1] = g
		else
			results[p] = { g.status, 0 }
		end
	end
	if plan and not same_events(plan, events) then return "more", 0 end
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
		local idx = conn:send("SET LOCAL synchronous_commit = off")
		if idx then pipe.sent[idx], pipe.async = false, true end
	end
	return true
end

local function store_parts(job, states)
	local up_p, up_s, up_v = {}, {}, {}
	local in_p, in_s, in_v = {}, {}, {}
	for i, g in ipairs(job.groups) do
		if g.new then
			in_p[#in_p + 1], in_s[#in_s + 1], in_v[#in_v + 1] = g.part, states[i], g.last
		else
			up_p[#up_p + 1], up_s[#up_s + 1], up_v[#up_v + 1] = g.part, states[i], g.last
		end
	end
	job.inserted = #in_p
	-- the checkpoints and COMMIT ride the same sync as the handlers'
	-- statements; after an error PostgreSQL skips them
	if #up_p > 0 then
		local idx = conn:send([[UPDATE projhost.checkpoints c SET state = coalesce(u.s::jsonb, c.state),
			last_pos = u.v, script_hash = $5, error = NULL, updated_at = now()
			FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(p, s, v)
			WHERE c.projection = $1 AND c.partition = u.p]],
			job.def.cp, pg_text_array(up_p), pg_text_array(up_s), "{" .. table.concat(up_v, ",") .. "}",
			job.def.hash)
		if idx then pipe.sent[idx] = state_tag(job) end
	end
	if #in_p > 0 then
		-- new partitions (see open_parts): no ON CONFLICT, a row made
		-- meanwhile must fail this batch
		local idx = conn:send([[INSERT INTO projhost.checkpoints (projection, partition, version, state,
			last_pos, script_hash)
			SELECT $1, u.p, $2, u.s::jsonb, u.v, $6 FROM unnest($3::text[], $4::text[], $5::bigint[]) AS u(p, s, v)
			ORDER BY u.p]],
			job.def.cp, job.def.version, pg_text_array(in_p), pg_text_array(in_s),
			"{" .. table.concat(in_v, ",") .. "}", job.def.hash)
		if idx then
			local tag = state_tag(job)
			tag.claim = true
			pipe.sent[idx] = tag
		end
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
		if not o then new_checkpoints = new_checkpoints + (job.inserted or 0) end
		return o
	end
end

-- Returns count, results { [part] = { status, delay } }.
local function run_partitions(def, parts)
	running = def
	local results = {}
	local function all(status, delay)
		for _, p in ipairs(parts) do results[p] = { status, delay or 0 } end
		return 0, results
	end
	local now = core.monotime()
	if def.shadow_of or not def._ok_at or now - def._ok_at > 1 then
		local ready, why = prepare(def)
		if ready ~= true then return all(ready, why) end
		if why == "reset" then
			-- every partition starts over; ask the master to rediscover
			results[""] = { "more", 0 }
		end
		def._ok_at = now
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
		report(def, committed, "", false)
		return committed, results
	end
	local total = 0
	for _, g in ipairs(job.groups) do
		results[g.part] = { g.status, 0 }
		total = total + (g.last - g.start)
	end

	db_failures = 0
	report(def, total, "", false)
	new_checkpoints = new_checkpoints + (job.inserted or 0)
	if new_checkpoints >= analyze_at then
		-- see new_checkpoints
		analyze_at = analyze_at * 2
		-- the planner needs the table's size, not fine statistics: a
		-- small sample (3,000 rows) takes 10 ms at 100,000 rows, not 100
		conn:exec("SET default_statistics_target = 10")
		local okA, errA = conn:exec("ANALYZE projhost.checkpoints")
		conn:exec("RESET default_statistics_target")
		if not okA then log("warn", def.cp, "ANALYZE projhost.checkpoints: " .. tostring(errA)) end
	end
	return total, results
end

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
		local rows, err, code = planned(sql, def.cp, t.stream, FIND_WALK, unpack(params))
		if not rows then dberror(def, err, code); return "dberror", {}, token end
		local tail = rows[#rows]
		for i = 1, #rows - 1 do out[i] = rows[i].stream_id end
		local found = t.found or #out > 0
		if tonumber(tail.n) == FIND_WALK then
			return "more", out, walk_token(t.xmin, found, t.t, tail.last), found, t
		end
		-- the walk is over: a clean one hands over to windows from its
		-- start; after one that found streams behind, walk again
		return "idle", out, found and "" or ("i %s 0 %d"):format(t.xmin, t.t), found, t
	end
	local sql, params = reads.window_sql(def)
	local rows, err, code = planned(sql, def.cp, t.tx, t.pos, FIND_WINDOW, unpack(params))
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

-- ---------------------------------------------------------------------
-- protocol (see core/proto.h; the Lua side is projhost.wire)

local wire = require "projhost.wire"

-- The paths served, and the definitions as last loaded (by checkpoint name).
local paths = {}

local function file_exists(path)
	local f = io.open(path, "r")
	if f then f:close() end
	return f ~= nil
end

-- Stored versions of the projections' own rows, when the database answers:
-- a definition whose version differs and rebuilds in the shadow runs under
-- "NAME@VERSION" beside the serving one (see promote()).
local function stored_versions()
	if not ensure_conn() then return {} end
	local rows = q("SELECT projection, version FROM projhost.checkpoints WHERE partition = ''")
	local out = {}
	for _, r in ipairs(rows or {}) do out[r.projection] = tonumber(r.version) end
	return out
end

-- (Re)load every file: new definitions replace old ones between batches; a
-- file that fails to load keeps its previous definition (the error names
-- file:line); a file that is gone stops its projection (state kept).
-- Returns the answer for the master.
local function load_all()
	local list, errors = loader.load_paths(paths)
	local previous = defs
	local stored = stored_versions()
	local out = {}
	local loaded_files = {}
	for _, def in ipairs(list) do loaded_files[def.file] = true end
	defs = {}
	local by_name = {}
	for _, def in ipairs(list) do by_name[def.name] = def end
	-- keep the previous version of files that exist but failed to load
	for _, old in pairs(previous) do
		if not loaded_files[old.file] and file_exists(old.file) and not by_name[old.name] then
			by_name[old.name] = old
			old._kept = true
		end
	end
	for _, e in ipairs(errors) do
		local kept = ""
		for _, old in pairs(previous) do
			if old._kept and e:sub(1, #old.file + 1) == old.file .. ":" then kept = old.name end
		end
		out[#out + 1] = wire.line("error", wire.truncate(e, wire.ERROR_MAX), kept)
	end
	for name, def in pairs(by_name) do
		def._kept = nil
		compile(def)
		def.cp, def.shadow_of = name, nil
		local sv = stored[name]
		if sv and sv ~= 0 and sv ~= def.version and def.rebuild == "shadow" then
			-- rebuild in the shadow; the old code keeps serving if we have it
			def.cp, def.shadow_of = name .. "@" .. def.version, name
			local old = previous[name]
			if old and old.version == sv and old ~= def then
				old.cp = name
				defs[name] = old
			end
		end
		defs[def.cp] = def
	end
	setup_done = {}
	for cp, def in pairs(defs) do
		local kind = def.from.all and "all" or def.from.stream and "stream" or "category"
		local value = def.from.stream or def.from.category or ""
		local budget = def.budget
		local line = wire.line("proj", cp, kind, value, def.partition and "1" or "0", tostring(budget), def.hash)
		if #line > wire.BUDGET then
			-- a name or source of megabytes would push the answer past
			-- the frame limit: refused like a file that fails to load
			defs[cp] = nil
			line = wire.line("error", wire.truncate(string.format(
				"%s: the projection's name or source is too long (%d bytes)", def.file, #line), wire.ERROR_MAX), "")
		end
		out[#out + 1] = line
	end
	out[#out + 1] = "ready"
	return table.concat(out, "\n")
end

local function init(fields)
	dsn = fields[2]
	paths = {}
	for i = 3, #fields do paths[#paths + 1] = fields[i] end
	return load_all()
end

-- The answer to a job lists the partitions it was given (so it is bounded
-- by the job, which the master bounds by bytes).

local function job(name, parts)
	local def = defs[name]
	local out = {}
	if not def then
		-- the master's list is older than ours (reload): nothing to do
		out[1] = wire.line("done", name, 0)
		for _, p in ipairs(parts) do out[#out + 1] = wire.line("part", p, "idle", 0) end
	elseif def.partition then
		local n, results = run_partitions(def, parts)
		out[1] = wire.line("done", name, n)
		-- in the job's order (the master finds each entry where it put
		-- it), then any the worker added (see run_partitions)
		for _, p in ipairs(parts) do
			local r = results[p]
			if r then
				-- no delay is nearly every answer (a float formatted per
				-- partition showed in profiles of 1,000,000 of them)
				local d = r[2]
				out[#out + 1] = wire.line("part", p, r[1], (d and d ~= 0) and string.format("%.3f", d) or "0")
				results[p] = nil
			end
		end
		for p, r in pairs(results) do
			out[#out + 1] = wire.line("part", p, r[1], string.format("%.3f", r[2] or 0))
		end
	else
		local status, n, delay = run_batch(def)
		out[1] = wire.line("done", name, n or 0)
		out[2] = wire.line("part", "", status, string.format("%.3f", delay or 0))
	end
	return table.concat(out, "\n")
end

-- Nothing behind any more: log it and run the caught_up hook, once per
-- transition.
function caught_up_partitioned(def)
	local key = def.cp .. "\t*"
	if caught[key] then return end
	caught[key] = true
	if ASYNC_CATCHUP then
		-- the catch-up's jobs may have committed without waiting for
		-- their WAL flush (see open_parts), on any worker: a write that
		-- waits for its own flush covers every commit before it, so a
		-- caught-up projection is on disk
		x("UPDATE projhost.checkpoints SET updated_at = now() WHERE projection = $1 AND partition = ''", def.cp)
	end
	log("info", def.cp, "caught up (every partition)")
	run_caught_up(def)
end

local function find(name, token)
	local def = defs[name]
	if not def or not def.partition then return wire.line("found", name, "idle", "") end
	local status, list, next_token, found, walk = find_partitions(def, token)
	if status ~= "more" and status ~= "idle" then
		-- paused, stopped, failed, dberror: the master waits for a wake-up
		-- (or the fallback poll) before looking again, from where it was
		status, next_token = "idle", token
	elseif status == "idle" and not found and def.shadow_of then
		-- a whole round found nothing behind
		if not promote(def) then status = "more" end
	elseif status == "idle" and not found then
		caught_up_partitioned(def)
	elseif #list > 0 then
		caught[def.cp .. "\t*"] = nil
	end
	-- bounded by bytes as well as by count. A walk's page stops at the
	-- budget and goes on after the last stream included; a window's streams
	-- left out are still behind when the next round looks (it starts
	-- before the first of them), so nothing is skipped either way
	local out, bytes, last = { "" }, 0, nil
	for _, s in ipairs(list) do
		local line = wire.line("part", s)
		if #line > wire.BUDGET then
			log("error", def.cp, string.format("a stream name of %d bytes is too long to be processed; left behind", #s))
			last = s
		elseif bytes + #line + 1 > wire.BUDGET then
			if walk then
				next_token, status = walk_token(walk.xmin, true, walk.t, last or walk.stream), "more"
			end
			break
		else
			out[#out + 1] = line
			bytes, last = bytes + #line + 1, s
		end
	end
	out[1] = wire.line("found", name, status, next_token)
	return table.concat(out, "\n")
end

-- The "overrun" lines of a job: projection name -> { [position] = { kind =,
-- reason = } } for this job only (see overrun).
local function overruns_of(lines)
	local o
	for i = 2, #lines do
		local l = lines[i]
		local pos = l[1] == "overrun" and tonumber(l[2])
		if pos then
			o = o or {}
			o[pos] = { kind = l[3] or "handler", reason = l[4] or "" }
			end_orphan(tonumber(l[5]))
		end
	end
	return o
end

function M.handle(msg)
	local lines = wire.parse(msg)
	local f = lines[1] or {}
	local verb = f[1]
	if verb == "job" then
		local parts = {}
		for i = 3, #f do parts[#parts + 1] = f[i] end
		if #parts == 0 then parts[1] = "" end
		overrun[f[2]] = overruns_of(lines)
		local reply = job(f[2], parts)
		if relist then reply, relist = reply .. "\n" .. wire.line("relist"), false end
		-- after "not enough memory" this state cannot be trusted: answer,
		-- then exit so the master starts a fresh worker
		return reply, out_of_memory
	elseif verb == "find" then
		overrun[f[2]] = overruns_of(lines)
		local reply = find(f[2], f[3] or "")
		if relist then reply, relist = reply .. "\n" .. wire.line("relist"), false end
		return reply
	elseif verb == "init" then
		return init(f)
	elseif verb == "reload" then
		return load_all()
	elseif verb == "quit" then
		rollback()
		return nil
	end
	error("unknown verb from the master: " .. tostring(verb))
end

function M.main()
	return core.serve(3, M.handle, 4, config.get("PROJHOST_WORKER_MEMORY_MB"))
end

return M
