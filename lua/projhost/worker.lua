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

local json = P.json

local M = {}

-- events per batch (unpartitioned) and per partition (partitioned)
local BATCH = tonumber(os.getenv("PROJHOST_BATCH_SIZE")) or 1000
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
-- partitions listed per discovery query
local FIND_PAGE = 1000
-- seconds a handler may run before the master kills its worker
-- (options.budget overrides it per projection; 0 = no limit)
local BUDGET = tonumber(os.getenv("PROJHOST_BUDGET")) or 30
-- runaway SQL (libpq syntax: "30s", "2min", or ms)
local STATEMENT_TIMEOUT = os.getenv("PROJHOST_STATEMENT_TIMEOUT") or "60s"
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
local ASYNC_CATCHUP = os.getenv("PROJHOST_SYNCHRONOUS_COMMIT") ~= "on"
-- default error action: retry with exponential backoff, then fail
local DEFAULT_RETRIES = 3

local dsn
local conn
local defs = {}            -- name -> def
local setup_done = {}      -- name -> true once setup ran on this connection
local db_down = false
local caught = {}          -- "name\tpartition" -> true while caught up
local progress = {}        -- name -> { at = monotime of the last line, n = events since }

local function log(level, who, msg)
	core.log(level, who, msg)
end

-- ---------------------------------------------------------------------
-- connection

local function drop_conn()
	if conn then conn:close() end
	conn = nil
	setup_done = {}
	for _, def in pairs(defs) do def._ok_at = nil end
end

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
	conn:exec("SET application_name = 'projhost worker'")
	-- event times in one unambiguous form (see to_event)
	conn:exec("SET TimeZone = 'UTC'")
	conn:exec("SET DateStyle = 'ISO'")
	-- our statements are short; JIT compiling one costs more than running it
	conn:exec("SET jit = off")
	local ok, err = conn:exec("SELECT set_config('statement_timeout', $1, false)", STATEMENT_TIMEOUT)
	if not ok then log("warn", "worker", "PROJHOST_STATEMENT_TIMEOUT=" .. STATEMENT_TIMEOUT .. ": " .. err) end
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

local function pg_text_array(list)
	local out = {}
	for i, s in ipairs(list) do
		out[i] = '"' .. s:gsub('[\\"]', '\\%0') .. '"'
	end
	return "{" .. table.concat(out, ",") .. "}"
end

-- created_at comes as the server prints it (UTC, see ensure_conn) and is
-- turned into ISO 8601 only when a handler reads e.time.
local COLS = [[global_position, transaction_id::text AS tx, event_id, stream_id,
	stream_version, event_type, data::text AS data, metadata::text AS metadata, created_at]]

-- The filter for def's source and event types, as SQL text plus the
-- parameters it needs, numbered from `first`.
local function source_filter(def, first)
	local sql, params = {}, {}
	local n = first
	if def.from.stream then
		sql[#sql + 1] = "stream_id = $" .. n
		params[#params + 1] = def.from.stream
		n = n + 1
	elseif def.from.category then
		-- category = the part of the stream before the first '-'
		sql[#sql + 1] = "split_part(stream_id, '-', 1) = $" .. n
		params[#params + 1] = def.from.category
		n = n + 1
	end
	if def.type_filter then
		sql[#sql + 1] = "event_type = ANY($" .. n .. "::text[])"
		params[#params + 1] = pg_text_array(def.type_filter)
	end
	local s = table.concat(sql, " AND ")
	return s ~= "" and (" AND " .. s) or "", params
end

-- Prepare the per-definition SQL once.
local function compile(def)
	local f, fp = source_filter(def, 4)
	def._read_sql = "SELECT " .. COLS .. [[
	FROM projhost.events
	WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
	  AND (transaction_id, global_position) > ($1::xid8, $2::bigint)]] .. f .. [[
	ORDER BY transaction_id, global_position
	LIMIT $3]]
	def._read_params = fp
	local hf, hp = source_filter(def, 1)
	-- committed events we may not read yet because an older transaction is
	-- still running somewhere in the cluster
	def._held_sql = [[SELECT 1 AS held FROM projhost.events
	WHERE transaction_id >= pg_snapshot_xmin(pg_current_snapshot())]] .. hf .. " LIMIT 1"
	def._held_params = hp
end

-- Events come from conn:events (core/lua_pg.c) as tables with the fields
-- handlers see most (position, version, stream, type); id, tx, data,
-- metadata and time stay in the page's result until first used, and data
-- and metadata stay JSON text until then, so a projection that only counts
-- events never pays for strings or JSON it does not read.
local LAZY = { id = true, tx = true, data = true, metadata = true, time = true }

local EVENT_MT = {
	__index = function(e, k)
		if not LAZY[k] then return nil end
		local page = rawget(e, "_page")
		local v = page and page:text(rawget(e, "_row"), k)
		if k == "data" or k == "metadata" then
			v = v and json.decode(v) or {}
		elseif k == "time" and v then
			-- "2026-11-22 22:55:40.123456+00" -> "2026-11-22T22:55:40.123456Z"
			v = v:gsub(" ", "T", 1):gsub("%+00$", "Z")
		end
		rawset(e, k, v)
		return v
	end,
}

P.event_mt = EVENT_MT

local function to_event(e)
	return setmetatable(e, EVENT_MT)
end

-- ---------------------------------------------------------------------
-- the ctx backend: the batch's own connection, inside its transaction

local failed_sql  -- first SQL error seen while running the current event
local failed_code -- and its SQLSTATE

-- Did the current event fail because the database went away (connection
-- lost, server shutting down) rather than because of the event? Then it
-- is not the event's fault: the batch is redone, nothing counted against it.
-- (57014, a statement timeout, is the event's own doing.)
local function db_fault()
	if not conn or not conn:ok() then return true end
	return failed_code ~= nil and (failed_code:match("^08") ~= nil or failed_code:match("^57P") ~= nil)
end

-- Pipeline mode for the handlers of a batch (design §5): ctx:exec queues
-- its statement without waiting for the round trip; the results are read
-- at the next ctx:query / ctx:emit or at the end of the batch. sent[i] is
-- the event that issued the i-th statement since the last sync, so an error
-- is charged to the event that caused it; first is the first error seen
-- ({ event, msg, code }) - after it the transaction is aborted anyway.
-- Also per batch: async (SET LOCAL synchronous_commit = off was sent),
-- writes (statements the handlers queued), and the page read ahead: ahead
-- (its statement index while pending), ahead_size (the size asked for),
-- ahead_page ({ page, events? } once taken; see take_ahead).
local pipe = { on = false, sent = {}, first = nil, flushing = false }

local function pipe_begin()
	pipe.sent, pipe.first, pipe.async = {}, nil, false
	pipe.ahead, pipe.ahead_page, pipe.writes = nil, nil, 0
	pipe.on = conn:pipeline(true) and true or false
end

local function pipe_note(idx, event, err, code)
	if pipe.first then return end
	local culprit = event
	if idx and idx <= #pipe.sent then culprit = pipe.sent[idx] end
	pipe.first = { event = culprit or false, err = err .. " [" .. tostring(code) .. "]", code = code }
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
-- the batch as { event (false: one of our own statements), err, code }, or nil.
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

local function backend_for(def)
	local b = {}
	local function note(err, code, idx)
		if not failed_sql then failed_sql, failed_code = err .. " [" .. tostring(code) .. "]", code end
		if pipe.on then pipe_note(idx, b.ctx and b.ctx.event, err, code) end
	end
	function b.exec(sql, ...)
		if pipe.on then
			local n, err, code = conn:send(sql, ...)
			if not n then note(err, code); return nil, err, code end
			-- "flush": ctx:upsert's set-based write of the whole batch
			pipe.sent[n] = pipe.flushing and "flush" or (b.ctx and b.ctx.event or false)
			pipe.writes = pipe.writes + 1
			return true
		end
		local n, err, code = conn:exec(sql, ...)
		if not n then note(err, code) end
		return n, err, code
	end
	function b.query(sql, ...)
		local rows, err, code, idx = conn:query(sql, ...)
		if not rows then note(err, code, idx) end
		pipe_synced()
		return rows, err, code
	end
	function b.emit(stream, etype, data, metadata)
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
			error("ctx:emit: the event cannot be encoded as JSON: " .. tostring(body), 3)
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
	if not def._ctx then
		local b = backend_for(def)
		def._ctx = P.new_ctx(def, b)
		b.ctx = def._ctx
	end
	return def._ctx
end

-- ---------------------------------------------------------------------
-- error actions

local ACTIONS = { retry = true, skip = true, park = true, fail = true, stop = true }

local function first_line(s)
	return (tostring(s):match("^[^\n]*"))
end

local function default_action(attempt)
	if attempt <= DEFAULT_RETRIES then return "retry", 0.5 * 2 ^ (attempt - 1) end
	return "fail"
end

-- Ask the projection's on_error what to do; fall back to the default when
-- it is missing, fails, or answers nonsense (and say so).
local function decide(def, err, e, attempt)
	if not def.on_error then return default_action(attempt) end
	local ok, action, delay = pcall(def.on_error, err, e, attempt)
	-- which event, as every log line about one says
	local at = ("pos=%s %s: "):format(tostring(e.position), def.file)
	if not ok then
		log("error", def.cp, at .. "on_error itself failed (" .. first_line(action) .. "); using the default action")
		return default_action(attempt)
	end
	if not ACTIONS[action] then
		log("error", def.cp, at .. "on_error returned " .. tostring(action) ..
			", expected retry|skip|park|fail|stop; using the default action")
		return default_action(attempt)
	end
	if action == "retry" then
		delay = tonumber(delay) or 0.5 * 2 ^ (attempt - 1)
		if delay < 0 then delay = 0 end
	end
	return action, delay
end

-- ---------------------------------------------------------------------
-- checkpoints, setup, reset

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

-- How many events the next batch of an unpartitioned projection reads,
-- after a state of state_len bytes, with events of event_len bytes on
-- average (see STATE_BYTES_PER_EVENT and PAGE_BYTES).
local function batch_for(state_len, event_len)
	local n = math.ceil(state_len / STATE_BYTES_PER_EVENT / BATCH) * BATCH
	n = math.min(n, math.floor(PAGE_BYTES / math.max(event_len, 1) / BATCH) * BATCH)
	return math.max(BATCH, math.min(BATCH * BATCH_GROWTH, n))
end

-- setup SQL and the projection's own checkpoint row, once per connection
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
			ok, err, code = x(sql)
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
		log("warn", def.cp, "batch rolled back: " .. tostring(err) .. (code and (" [" .. code .. "]") or ""))
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
		ok, err, code = x(sql)
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
-- then carries a "\t!relist" line and the master reloads every worker.
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
local function script_failed(def, err, code, is_script)
	if not is_script then return "dberror", dberror(def, err, code) end
	log("error", def.cp, def.file .. ": " .. err)
	set_status(def, "", "failed", err)
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

local function traceback(err)
	return debug.traceback(err, 2)
end

-- Events on which a worker died running projection code (the watchdog's
-- kill past the budget, exit() in a C library, a signal), as the master's
-- job says: projection name -> { [position] = { kind = "handler" |
-- "on_error" | "caught_up" | "init" | "sql" | "load", reason = "overran its
-- budget of 2s" | "the worker died (signal 11)" | ... } }, for the current
-- job only. Meeting one counts as a failure of that event without running
-- the code again.
local overrun = {}
local out_of_memory = false

-- Apply one event; returns ok, new state or error text. core.beat tells the
-- master's watchdog which event is running since when.
local function apply(def, state, e, ctx)
	local o = overrun[def.cp]
	if o and o[e.position] then
		local why = o[e.position]
		o[e.position] = nil
		return false, string.format("%s: %s %s", def.file, why.kind, why.reason)
	end
	ctx.event = e
	failed_sql, failed_code = nil, nil
	core.beat(e.position)
	local ok, res = xpcall(P.apply, traceback, def, state, e, ctx)
	core.beat()
	if ok and failed_sql then
		-- the handler caught a failed statement and went on, but the
		-- transaction is aborted: the event failed
		ok, res = false, "SQL error (caught by the handler): " .. failed_sql
	end
	ctx.event = nil
	if not ok and tostring(res):find("not enough memory", 1, true) then out_of_memory = true end
	return ok, res
end

-- The unpartitioned batch: handlers for events[1..n] inside ONE protected
-- call (a pcall per event costs more than a counting handler itself).
-- applying says which event was running when an error escaped.
local applying = 0

local function apply_loop(def, state, events, ctx, n)
	local papply, beat = P.apply, core.beat
	local ahead = pipe.ahead
	for i = 1, n do
		local e = events[i]
		applying = i
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
	beat()
	ctx.event = nil
	return state
end

-- Apply events[1..#events]; returns ok, state | false, index, error.
local function apply_batch(def, state, events, ctx)
	local n = #events
	local o = overrun[def.cp]
	local overrun_at
	if o then
		for i = 1, n do
			if o[events[i].position] then overrun_at, n = i, i - 1; break end
		end
	end
	local ok, res = xpcall(apply_loop, traceback, def, state, events, ctx, n)
	if not ok then
		core.beat()
		ctx.event = nil
		if tostring(res):find("not enough memory", 1, true) then out_of_memory = true end
		return false, applying, res
	end
	if overrun_at then
		-- counted as a failure without running the handler again
		local _, err = apply(def, res, events[overrun_at], ctx)
		return false, overrun_at, err
	end
	return true, res
end

local function visible(def, etype)
	if not def.type_filter then return true end
	if not def._types then
		def._types = {}
		for _, t in ipairs(def.type_filter) do def._types[t] = true end
	end
	return def._types[etype] == true
end

-- The error action for event e of partition part, after everything before
-- it has been committed. The attempt count lives in the checkpoint row, so
-- it survives worker restarts and is shared by every worker and instance.
-- Returns status, delay.
local function error_action(def, part, e, err)
	local where = string.format("pos=%d event %s@%d (%s)", e.position, e.stream, e.version, e.type)
	if not ensure_conn() then return "dberror", backoff() end
	local ok, xerr, xcode = x("BEGIN")
	local row
	if ok then
		row, xerr, xcode = lock_checkpoint(def, part)
		ok = row
	end
	if ok == nil then return "dberror", dberror(def, xerr, xcode) end
	if row == false then rollback(); return "locked", 0 end
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
	return status, delay or 0
end

local function load_event(position)
	local rows, err, code = conn:events("SELECT " .. COLS .. " FROM projhost.events WHERE global_position = $1",
		position)
	if not rows then return nil, err, code end
	return rows[1] and to_event(rows[1]) or false
end

local function partition_of(def, e)
	return def.partition and e.stream or ""
end

-- `projhost parked retry` flagged parked events of def: run each again, in
-- its own transaction under its partition's lock, against the partition's
-- current state. Success removes it from the dead letters; failure parks it
-- again with the new error. Checked at most once a second per projection.
local parked_checked = {}

function retry_parked(def)
	local now = core.monotime()
	if now - (parked_checked[def.cp] or 0) < 1 then return end
	parked_checked[def.cp] = now
	local list = q([[SELECT id, partition, global_position FROM projhost.parked
		WHERE projection = $1 AND retry_requested ORDER BY global_position LIMIT 100]], def.cp)
	if not list or #list == 0 then return end
	local ctx = ctx_for(def)
	for _, p in ipairs(list) do
		local ok = x("BEGIN")
		local row = ok and lock_checkpoint(def, p.partition)
		local claimed = row and q([[DELETE FROM projhost.parked WHERE id = $1 AND retry_requested
			RETURNING id]], p.id)
		local e = claimed and #claimed == 1 and load_event(p.global_position)
		if not e then
			rollback() -- partition busy, claimed by another worker, or the event is gone
		else
			local state = row.state and json.decode(row.state)
			if state == nil then state = P.init_state(def) end
			ctx._discard()
			local okh, res = apply(def, state, e, ctx)
			if okh then
				local okf, ferr = ctx._flush()
				if not okf then okh, res = false, ferr end
			end
			local sj
			if okh then
				sj, res = encode_state(def, res)
				okh = sj ~= nil
			end
			if okh then
				ok = x([[UPDATE projhost.checkpoints SET state = $3::jsonb, updated_at = now()
					WHERE projection = $1 AND partition = $2]], def.cp, p.partition, sj)
				if ok and x("COMMIT") then
					log("info", def.cp, string.format("pos=%d parked event applied on retry", e.position))
				else
					rollback()
				end
			else
				rollback()
				log("error", def.cp, string.format("pos=%d parked event failed again: %s", e.position,
					first_line(res)))
				x([[UPDATE projhost.parked SET retry_requested = false, attempts = attempts + 1,
					error = $2, parked_at = now() WHERE id = $1]], p.id, first_line(res))
			end
		end
	end
end

-- Which event failed first, and why: a queued statement's error (reported
-- at the sync) comes before a later handler's Lua error. Returns event,
-- error text; false, text when one of our own statements failed; "flush",
-- text when ctx:upsert's write of the batch failed; nil when nothing failed.
local function failure_of(events, fail_i, fail_err, first)
	if first then
		failed_code = first.code
		if not first.event then return false, first.err end
		if first.event == "flush" then return "flush", "ctx:upsert: " .. first.err end
		if fail_i and events[fail_i] == first.event then
			return first.event, fail_err -- the handler raised on it, with its line
		end
		return first.event, "ctx:exec: " .. first.err
	end
	if fail_i then return events[fail_i], fail_err end
	return nil
end

-- Write the batch's ctx:upsert rows (queued in the pipeline like the rest).
local function flush_upserts(ctx)
	pipe.flushing = true
	local ok, err = ctx._flush()
	pipe.flushing = false
	return ok, err
end

-- ---------------------------------------------------------------------
-- one batch of an unpartitioned projection: read in (transaction_id,
-- global_position) order below the xmin horizon (design §2)

local run_batch, caught_up_partitioned

-- Returns status, count, delay (statuses: see core/master.c).
-- Two round trips: [BEGIN, lock the checkpoint row, read, held-back check],
-- then [the handlers' statements, checkpoint, COMMIT].
function run_batch(def, limit)
	-- the full check (setup, version, status, shadows, parked retries) at
	-- most once a second; the locked row is checked on every batch anyway
	local now = core.monotime()
	if def.shadow_of or not def._ok_at or now - def._ok_at > 1 then
		local ready, why = prepare(def)
		if ready ~= true then return ready, 0, why end
		if why == "reset" then limit = nil end
		def._ok_at = now
	elseif not ensure_conn() then
		return "dberror", 0, backoff()
	end

	pipe_begin()
	if not pipe.on then return "dberror", 0, dberror(def, "cannot enter pipeline mode") end
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
	conn:send("BEGIN")
	-- xmin tells whether anyone (a parked retry, another instance, an
	-- operator) wrote the row since our last commit
	conn:send_query([[SELECT version, CASE WHEN $2 THEN state::text END AS state, last_tx::text AS last_tx,
		last_pos, status, xmin::text AS rx, xid(pg_current_xact_id())::text AS my_xid
		FROM projhost.checkpoints WHERE projection = $1 AND partition = ''
		FOR UPDATE SKIP LOCKED]], def.cp, guess == nil)
	-- a full page read ahead by the previous batch (see below) is this
	-- batch's page, if the checkpoint is still where that batch left it
	local ahead = not limit and guess and guess.ahead
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
		return "dberror", 0, dberror(def, res, code)
	end
	local row, rows, held = res[2][1], res[3], #res[4] > 0
	local hit = row and guess and guess.rx == row.rx and guess.tx == row.last_tx
		and guess.pos == tonumber(row.last_pos)
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
			return "dberror", 0, dberror(def, err2 or "reading the state failed", code)
		end
		pipe.sent = {}
	end
	if not row or row.status ~= "running" or tonumber(row.version) ~= def.version then
		pipe_end()
		rollback()
		def._ok_at = nil -- look properly next time (row gone, paused, new version)
		if not row then
			setup_done[def.cp] = nil
			return "locked", 0, 0
		end
		if row.status ~= "running" then return row.status, 0, 0 end
		return "more", 0, 0
	end

	local state
	if hit then
		state = guess.state
	else
		state = row.state and json.decode(row.state)
		if state == nil then state = P.init_state(def) end
	end

	pipe.sent = {}
	if not limit and (ahead or #rows == want) then
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
	if ahead then rows = ahead.events or ahead.page:events() end

	local ctx = ctx_for(def)
	ctx._discard()
	local events = rows
	for i = 1, #events do
		local e = to_event(events[i])
		e.index = i
	end
	local fail_i, fail_err
	local res1, res2, res3 = apply_batch(def, state, events, ctx)
	if res1 then state = res2 else fail_i, fail_err = res2, res3 end
	if not fail_i then
		local okf, ferr0 = flush_upserts(ctx)
		if not okf then fail_i, fail_err = #events, ferr0 end
	end

	local n, last_pos = #events, tonumber(row.last_pos)
	local status, key = "more", def.cp .. "\t"
	if not limit and n < want then status = held and "held" or "idle" end
	if not fail_i and status == "idle" and not caught[key] and def.caught_up then
		failed_sql = nil
		local okc, cerr = xpcall(def.caught_up, traceback, ctx)
		if okc then okc, cerr = ctx._flush() end
		if not okc or failed_sql then
			pipe_end()
			rollback()
			log("error", def.cp, "caught_up failed: " .. first_line(cerr or failed_sql))
			return "retry", 0, 1
		end
	end
	local state_err -- the state after the batch cannot be stored
	if not fail_i then
		local sj
		if n > 0 then sj, state_err = encode_state(def, state) end
		if sj then
			local last = events[n]
			local page = events[n]._page
			def._batch = batch_for(#sj, page and page:bytes() / page:count() or 0)
			conn:send([[UPDATE projhost.checkpoints SET state = $2::jsonb, last_tx = $3::xid8,
				last_pos = $4, script_hash = $5, error = NULL, updated_at = now()
				WHERE projection = $1 AND partition = '']],
				def.cp, sj, last.tx, last.position, def.hash)
			last_pos = last.position
		end
		if not state_err then
			conn:send("COMMIT")
			take_ahead()
		end
	end

	local fe, ferr = failure_of(events, fail_i, fail_err, pipe_end())
	if not fe and state_err then fe, ferr = "flush", state_err end
	if fe == false or (fe and db_fault()) then return "dberror", 0, dberror(def, first_line(ferr), failed_code) end
	if not fe then
		def._last = { tx = n > 0 and events[n].tx or row.last_tx, pos = last_pos, state = state,
			rx = n > 0 and row.my_xid or row.rx, ahead = ahead_page() }
	end
	if fe == "flush" then
		-- the set-based write of the batch, or its state, failed: find
		-- the event that makes it fail by committing halves (one event:
		-- that one)
		rollback()
		if #events > 1 then return run_batch(def, math.floor(#events / 2)) end
		fe = events[1]
	end
	if fe then
		ctx._discard()
		-- nothing of this batch committed: commit the events before
		-- the failing one, then apply the error action to it
		rollback()
		if fe.index > 1 then
			local st, cnt, d = run_batch(def, fe.index - 1)
			if st ~= "more" then return st, cnt, d end
		end
		local st, delay = error_action(def, "", fe, ferr)
		return st, fe.index - 1, delay
	end
	db_failures = 0

	if n == want then caught[key] = nil end
	report(def, n, string.format("pos=%d ", last_pos), status == "idle" and not caught[key])
	if status == "idle" and not caught[key] then
		caught[key] = true
		log("info", def.cp, string.format("pos=%d caught up", last_pos))
	end
	if status == "idle" and def.shadow_of then
		local okp, err, pcode = promote(def)
		if not okp then return "dberror", n, dberror(def, err, pcode) end
		return "idle", n, 0
	end
	return status, n, 0
end

-- ---------------------------------------------------------------------
-- partitioned projections: one state and checkpoint (stream_version) per
-- stream; many partitions per transaction

local function stream_in_source(def, stream)
	if def.from.all then return true end
	if def.from.stream then return stream == def.from.stream end
	return (stream:match("^[^-]*")) == def.from.category
end

-- Returns count, results { [part] = { status, delay } }.
-- Checkpoint rows this worker created. A new partitioned projection over
-- many streams grows projhost.checkpoints from nothing to a row per stream
-- in minutes, faster than autovacuum analyzes it, and with the statistics
-- of an empty table the planner scans the whole table for every job (make
-- bench: 1 worker 10x slower on a fresh database). So the worker analyzes
-- it itself each time its count doubles: a dozen times for a million.
local new_checkpoints, analyze_at = 0, 1000

local function run_partitions(def, parts, stop_at)
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
			stop_at = nil
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
	local arr = pg_text_array(wanted)

	-- One round trip: open, lock the partitions' rows, and read each
	-- stream past its checkpoint (dense index scan); rows another worker
	-- holds are skipped by the lock and their events ignored.
	pipe_begin()
	if not pipe.on then return all("dberror", dberror(def, "cannot enter pipeline mode")) end
	conn:send("BEGIN")
	-- shared: a version reset (exclusive) waits for batches in flight
	conn:send("SELECT pg_advisory_xact_lock_shared(hashtext('projhost:' || $1))", def.cp)
	conn:send([[INSERT INTO projhost.checkpoints (projection, partition, version)
		SELECT $1, p, $2 FROM unnest($3::text[]) AS p ON CONFLICT DO NOTHING]], def.cp, def.version, arr)
	conn:send_query([[SELECT partition, state::text AS state, last_pos, status
		FROM projhost.checkpoints WHERE projection = $1 AND partition = ANY($2::text[])
		ORDER BY partition FOR UPDATE SKIP LOCKED]], def.cp, arr)
	conn:send_events([[SELECT c.partition AS partition, e.global_position, e.tx, e.event_id, e.stream_id,
			e.stream_version, e.event_type, e.data, e.metadata, e.created_at
		FROM projhost.checkpoints c
		CROSS JOIN LATERAL (
			SELECT ]] .. COLS .. [[ FROM projhost.events ev
			WHERE ev.stream_id = c.partition AND ev.stream_version > c.last_pos
			ORDER BY ev.stream_version LIMIT $3) e
		WHERE c.projection = $1 AND c.partition = ANY($2::text[])
		ORDER BY c.partition, e.stream_version]], def.cp, arr, BATCH)
	local ok, res, code = conn:sync(true)
	if not ok then
		pipe.on = false
		if conn:ok() then conn:pipeline(false) end
		local d = dberror(def, res, code)
		for _, p in ipairs(wanted) do results[p] = { "dberror", d } end
		return 0, results
	end
	local rows, evrows = res[4], res[5]
	new_checkpoints = new_checkpoints + (tonumber(res[3]) or 0)

	local locked, cps = {}, {}
	for _, r in ipairs(rows) do
		if r.status ~= "running" then
			results[r.partition] = { r.status, 0 }
		else
			locked[#locked + 1] = r
			cps[#cps + 1] = r.partition
		end
	end
	local is_locked = {}
	for _, p in ipairs(cps) do is_locked[p] = true end
	for _, p in ipairs(wanted) do
		if not results[p] and not is_locked[p] then results[p] = { "locked", 0 } end
	end
	if #locked == 0 then
		pipe_end()
		rollback()
		return 0, results
	end
	pipe.sent = {}

	local by_part = {}
	for _, r in ipairs(evrows) do
		local l = by_part[r.partition]
		if not l then l = {}; by_part[r.partition] = l end
		l[#l + 1] = r
	end

	local ctx = ctx_for(def)
	ctx._discard()
	local up_p, up_s, up_v = {}, {}, {}
	local total = 0
	local seen, fail_i, fail_err = {}, nil, nil
	local state_fail -- { p, first version, events applied, err }: see below
	for _, cp in ipairs(locked) do
		local p = cp.partition
		local list = by_part[p] or {}
		local state = cp.state and json.decode(cp.state)
		if state == nil then state = P.init_state(def) end
		local last = tonumber(cp.last_pos)
		local status = #list >= BATCH and "more" or "idle"
		local applied = 0
		for _, r in ipairs(list) do
			local e = to_event(r)
			if e.version ~= last + 1 then
				-- versions commit in order, so a gap is one still in flight
				status = "held"
				break
			end
			if stop_at and stop_at[p] and e.version >= stop_at[p] then
				status = "more"
				break
			end
			if visible(def, e.type) then
				seen[#seen + 1] = e
				e.index, e.partition = #seen, p
				local okh, res = apply(def, state, e, ctx)
				if not okh then
					fail_i, fail_err = #seen, res
					break
				end
				state = res
			end
			last = e.version
			applied = applied + 1
		end
		if fail_i then break end
		if applied > 0 then
			local sj, serr = encode_state(def, state)
			if not sj then
				-- which of its events made it so is found below
				fail_i, fail_err = #seen, serr
				state_fail = { p = p, first = tonumber(cp.last_pos) + 1, applied = applied, err = serr }
				break
			end
			up_p[#up_p + 1] = p
			up_s[#up_s + 1] = sj
			up_v[#up_v + 1] = last
			total = total + applied
		end
		results[p] = { status, 0 }
	end
	if not fail_i and #seen > 0 then
		local okf, ferr0 = flush_upserts(ctx)
		if not okf then fail_i, fail_err = #seen, ferr0 end
	end
	if not fail_i then
		-- the checkpoints and COMMIT ride the same sync as the handlers'
		-- statements; after an error PostgreSQL skips them
		if #up_p > 0 then
			conn:send([[UPDATE projhost.checkpoints c SET state = u.s::jsonb, last_pos = u.v,
				script_hash = $5, error = NULL, updated_at = now()
				FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(p, s, v)
				WHERE c.projection = $1 AND c.partition = u.p]],
				def.cp, pg_text_array(up_p), pg_text_array(up_s), "{" .. table.concat(up_v, ",") .. "}", def.hash)
		end
		conn:send("COMMIT")
	end
	local fe, ferr = failure_of(seen, fail_i, fail_err, pipe_end())
	if fe == false or (fe and db_fault()) then
		local d = dberror(def, first_line(ferr), failed_code)
		for _, p2 in ipairs(cps) do results[p2] = { "dberror", d } end
		return 0, results
	end
	if fe and state_fail and ferr == state_fail.err and state_fail.applied > 1 then
		-- a partition's state cannot be stored after its events: commit
		-- only its first one (and every other partition's); the next job
		-- goes on from there, until one event alone makes the state fail
		ctx._discard()
		rollback()
		local s2 = {}
		for k, v in pairs(stop_at or {}) do s2[k] = v end
		s2[state_fail.p] = state_fail.first + 1
		return run_partitions(def, parts, s2)
	end
	-- ctx:upsert's write of the batch failed: charged to the batch's last
	-- event (partitioned batches do not bisect)
	if fe == "flush" then fe = seen[#seen] end
	if fe then
		ctx._discard()
		-- roll everything back, commit all but this event and what
		-- follows it in its stream, then act on it
		rollback()
		local s2 = {}
		for k, v in pairs(stop_at or {}) do s2[k] = v end
		s2[fe.partition] = fe.version
		local n2, res2 = run_partitions(def, parts, s2)
		local st, delay = error_action(def, fe.partition, fe, ferr)
		res2[fe.partition] = { st, delay }
		return n2, res2
	end

	db_failures = 0
	report(def, total, "", false)
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

-- Partitions of def that are behind: streams of its source whose version
-- is past their checkpoint (goengine's LoadOutOfSync), a page at a time,
-- from the streams table (never a scan of the events).
local function find_partitions(def, cursor)
	local ready, why = prepare(def)
	if ready ~= true then return ready, {} end
	if why == "reset" then cursor = "" end
	local filter, params = "", {}
	if def.from.stream then
		filter = " AND s.stream_id = $4"
		params[1] = def.from.stream
	elseif def.from.category then
		-- streams of category C sort between "C" and "C." ('.' follows
		-- '-'): a range on the primary key, then the exact test
		filter = " AND s.stream_id >= $4 AND s.stream_id < $4 || '.' AND split_part(s.stream_id, '-', 1) = $4"
		params[1] = def.from.category
	end
	-- Walk the streams in key order from the cursor and look each one's
	-- checkpoint up by primary key: a page costs what it returns (plus
	-- the caught-up streams it passes), never a join over every stream.
	local rows, err, code = q([[SELECT s.stream_id FROM projhost.streams s
		WHERE s.stream_id > $2]] .. filter .. [[
		  AND s.version > coalesce((SELECT CASE WHEN c.status = 'running' THEN c.last_pos
				ELSE 9223372036854775807 END
			FROM projhost.checkpoints c WHERE c.projection = $1 AND c.partition = s.stream_id), 0)
		ORDER BY s.stream_id LIMIT $3]], def.cp, cursor, FIND_PAGE, unpack(params))
	if not rows then return "dberror", {}, dberror(def, err, code) end
	local out = {}
	for i, r in ipairs(rows) do out[i] = r.stream_id end
	return #out == FIND_PAGE and "more" or "idle", out
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
		local budget = tonumber(def.options.budget) or BUDGET
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
	if def.caught_up then
		local ctx = ctx_for(def)
		x("BEGIN")
		failed_sql = nil
		ctx._discard()
		local ok, err = xpcall(def.caught_up, traceback, ctx)
		if ok then ok, err = ctx._flush() end
		if not ok or failed_sql then
			rollback()
			log("error", def.cp, "caught_up failed: " .. first_line(err or failed_sql))
			return
		end
		if not x("COMMIT") then return end
	end
	caught[key] = true
	log("info", def.cp, "caught up (every partition)")
end

local function find(name, cursor)
	local def = defs[name]
	if not def or not def.partition then return wire.line("found", name, "idle", "") end
	local status, list = find_partitions(def, cursor)
	if status ~= "more" and status ~= "idle" then
		-- paused, stopped, failed, dberror: the master waits for a wake-up
		-- (or the fallback poll) before looking again
		status = "idle"
	elseif #list == 0 and cursor == "" and def.shadow_of then
		if not promote(def) then status = "more" end
	elseif #list == 0 and cursor == "" then
		caught_up_partitioned(def)
	elseif #list > 0 then
		caught[def.cp .. "\t*"] = nil
	end
	-- bounded by bytes as well as by count: the answer stops at the
	-- budget and its cursor is the last stream included, so the next page
	-- goes on from there and nothing is skipped
	local out, bytes, last = { "" }, 0, nil
	for _, s in ipairs(list) do
		local line = wire.line("part", s)
		if #line > wire.BUDGET then
			log("error", def.cp, string.format("a stream name of %d bytes is too long to be processed; left behind", #s))
			last = s
		elseif bytes + #line + 1 > wire.BUDGET then
			status = "more"
			break
		else
			out[#out + 1] = line
			bytes, last = bytes + #line + 1, s
		end
	end
	out[1] = wire.line("found", name, status, last or "")
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
	return core.serve(3, M.handle, 4)
end

return M
