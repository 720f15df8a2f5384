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
local cjson_mod = require "cjson"
local loader = require "projhost.loader"
local P = require "projhost.projection"

local json = cjson_mod.new()
-- state is ours to round-trip exactly: keep 17 digits, allow sparse arrays
json.encode_number_precision(17)
json.encode_sparse_array(true)

local M = {}

local BATCH = tonumber(os.getenv("PROJHOST_BATCH_SIZE")) or 500
-- default error action: retry with exponential backoff, then fail
local DEFAULT_RETRIES = 3

local dsn
local conn
local defs = {}            -- name -> def
local setup_done = {}      -- name -> true once setup ran on this connection
local db_down = false
local attempts = {}        -- "name\tpartition\tposition" -> failures so far
local caught = {}          -- "name\tpartition" -> true while caught up
local progress_at = {}     -- name -> monotime of the last progress line

local function log(level, who, msg)
	core.log(level, who, msg)
end

-- ---------------------------------------------------------------------
-- connection

local function drop_conn()
	if conn then conn:close() end
	conn = nil
	setup_done = {}
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

local COLS = [[global_position, transaction_id::text AS tx, event_id, stream_id,
	stream_version, event_type, data::text AS data, metadata::text AS metadata,
	to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at]]

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

local function read_events(def, last_tx, last_pos, limit)
	local p = def._read_params
	return q(def._read_sql, last_tx, last_pos, limit, unpack(p, 1, #p))
end

local function held_back(def)
	local p = def._held_params
	local rows = q(def._held_sql, unpack(p, 1, #p))
	return rows and #rows > 0
end

local function to_event(r)
	return {
		id = r.event_id,
		stream = r.stream_id,
		version = tonumber(r.stream_version),
		position = tonumber(r.global_position),
		type = r.event_type,
		data = json.decode(r.data),
		metadata = json.decode(r.metadata),
		time = r.created_at,
		tx = r.tx,
	}
end

-- ---------------------------------------------------------------------
-- the ctx backend: the batch's own connection, inside its transaction

local failed_sql  -- first SQL error seen while running the current event

local function backend_for(def)
	local b = {}
	function b.exec(sql, ...)
		local n, err, code = conn:exec(sql, ...)
		if not n then failed_sql = failed_sql or (err .. " [" .. tostring(code) .. "]") end
		return n, err, code
	end
	function b.query(sql, ...)
		local rows, err, code = conn:query(sql, ...)
		if not rows then failed_sql = failed_sql or (err .. " [" .. tostring(code) .. "]") end
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
		if md.projection == nil then md.projection = def.name end
		local body = json.encode({ { type = etype, data = data or {}, metadata = md } })
		local rows, err, code = conn:query("SELECT projhost.append($1, NULL, $2::jsonb) AS version", stream, body)
		if not rows then
			failed_sql = failed_sql or (err .. " [" .. tostring(code) .. "]")
			return nil, err, code
		end
		return tonumber(rows[1].version)
	end
	function b.log(level, msg)
		local ev = b.ctx and b.ctx.event
		log(level, def.name, ev and ("pos=" .. ev.position .. " " .. msg) or msg)
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
	if not ok then
		log("error", def.name, "on_error itself failed (" .. first_line(action) .. "); using the default action")
		return default_action(attempt)
	end
	if not ACTIONS[action] then
		log("error", def.name, "on_error returned " .. tostring(action) ..
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
-- one batch

local function lock_checkpoint(def, part)
	local rows, err, code = q([[SELECT version, state::text AS state, last_tx::text AS last_tx,
		last_pos, status FROM projhost.checkpoints
		WHERE projection = $1 AND partition = $2 FOR UPDATE SKIP LOCKED]], def.name, part)
	if not rows then return nil, err, code end
	return rows[1] or false
end

local function store_checkpoint(def, part, state, last_tx, last_pos)
	return x([[UPDATE projhost.checkpoints SET state = $3::jsonb, last_tx = $4::xid8,
		last_pos = $5, script_hash = $6, updated_at = now()
		WHERE projection = $1 AND partition = $2]],
		def.name, part, json.encode(state), last_tx, last_pos, def.hash)
end

-- setup SQL and the checkpoint row, once per connection
local function ensure_setup(def)
	if setup_done[def.name] then return true end
	local ok, err, code = x([[INSERT INTO projhost.checkpoints (projection, partition, version)
		VALUES ($1, '', $2) ON CONFLICT DO NOTHING]], def.name, def.version)
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
	setup_done[def.name] = true
	return true
end

local function set_status(def, part, status, msg)
	x([[UPDATE projhost.checkpoints SET status = $3, error = $4, updated_at = now()
		WHERE projection = $1 AND partition = $2]], def.name, part, status, msg)
end

local db_failures = 0

-- Our own statement failed (connection lost, deadlock, server restart):
-- the batch rolled back; the master runs it again after a growing delay.
local function dberror(def, err, code)
	rollback()
	if conn and not conn:ok() then drop_conn() end
	db_failures = db_failures + 1
	if db_failures == 1 or not db_down then
		log("warn", def.name, "batch rolled back: " .. tostring(err) .. (code and (" [" .. code .. "]") or ""))
	end
	return "dberror", 0, math.min(0.25 * 2 ^ (db_failures - 1), 30)
end

local run_batch

-- A handler failed on events[i]: nothing of the batch committed. Commit
-- the events before it, then apply the error action to it.
local function handle_failure(def, part, events, i, err)
	rollback()
	local e = events[i]
	if i > 1 then
		local status = run_batch(def, part, i - 1)
		if status ~= "more" and status ~= "idle" then return status, 0, 1 end
	end
	local key = def.name .. "\t" .. part .. "\t" .. e.position
	local attempt = (attempts[key] or 0) + 1
	attempts[key] = attempt
	local where = string.format("pos=%d event %s@%d (%s)", e.position, e.stream, e.version, e.type)
	local action, delay = decide(def, err, e, attempt)
	log("error", def.name, string.format("%s failed (attempt %d): %s -> %s%s", where, attempt,
		first_line(err), action, action == "retry" and string.format(" in %.2fs", delay) or ""))
	if action == "retry" then return "retry", 0, delay end
	attempts[key] = nil

	x("BEGIN")
	local row, lerr, lcode = lock_checkpoint(def, part)
	if row == nil then return dberror(def, lerr, lcode) end
	if row == false then rollback(); return "locked", 0, 0 end
	local ok, xerr, xcode
	if action == "skip" or action == "park" then
		ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET last_tx = $3::xid8, last_pos = $4,
			updated_at = now() WHERE projection = $1 AND partition = $2]], def.name, part, e.tx, e.position)
		if ok and action == "park" then
			ok, xerr, xcode = x([[INSERT INTO projhost.parked (projection, partition, global_position,
				event_id, stream_id, stream_version, event_type, error, attempts)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)]], def.name, part, e.position, e.id,
				e.stream, e.version, e.type, first_line(err), attempt)
		end
	else
		ok, xerr, xcode = x([[UPDATE projhost.checkpoints SET status = $3, error = $4, updated_at = now()
			WHERE projection = $1 AND partition = $2]], def.name, part,
			action == "fail" and "failed" or "stopped", where .. ": " .. first_line(err))
	end
	if ok then ok, xerr, xcode = x("COMMIT") end
	if not ok then return dberror(def, xerr, xcode) end
	if action == "skip" or action == "park" then return "more", 1, 0 end
	return action == "fail" and "failed" or "stopped", 0, 0
end

local function traceback(err)
	return debug.traceback(err, 2)
end

-- Returns status, count, delay (see core/master.c for the statuses).
function run_batch(def, part, limit)
	local ok, err, code = ensure_conn()
	if not ok then
		db_failures = db_failures + 1
		return "dberror", 0, math.min(0.25 * 2 ^ (db_failures - 1), 30)
	end
	local isset
	ok, err, code, isset = ensure_setup(def)
	if not ok then
		if isset then
			log("error", def.name, def.file .. ": " .. err)
			set_status(def, part, "failed", err)
			return "failed", 0, 0
		end
		return dberror(def, err, code)
	end

	ok, err, code = x("BEGIN")
	if not ok then return dberror(def, err, code) end
	local row
	row, err, code = lock_checkpoint(def, part)
	if row == nil then return dberror(def, err, code) end
	if row == false then rollback(); return "locked", 0, 0 end
	if row.status ~= "running" then rollback(); return row.status, 0, 0 end

	local last_tx, last_pos = row.last_tx, tonumber(row.last_pos)
	local state
	if tonumber(row.version) ~= def.version then
		-- new version (or `projhost reset`): reset SQL, then rebuild from the start
		for _, sql in ipairs(def.reset) do
			ok, err, code = x(sql)
			if not ok then
				rollback()
				log("error", def.name, def.file .. ": reset statement failed: " .. err)
				set_status(def, part, "failed", "reset failed: " .. err)
				return "failed", 0, 0
			end
		end
		ok, err, code = x([[UPDATE projhost.checkpoints SET version = $3, state = NULL, last_tx = '0',
			last_pos = 0, error = NULL, updated_at = now() WHERE projection = $1 AND partition = $2]],
			def.name, part, def.version)
		if not ok then return dberror(def, err, code) end
		log("info", def.name, string.format("version %s -> %d: reset, rebuilding from the start",
			row.version, def.version))
		last_tx, last_pos = "0", 0
		caught[def.name .. "\t" .. part] = nil
	else
		state = row.state and json.decode(row.state)
	end
	if state == nil then state = P.init_state(def) end

	local rows
	rows, err, code = read_events(def, last_tx, last_pos, limit or BATCH)
	if not rows then return dberror(def, err, code) end

	local ctx = ctx_for(def)
	local events = {}
	for i, r in ipairs(rows) do
		local e = to_event(r)
		events[i] = e
		ctx.event = e
		failed_sql = nil
		local okh, res = xpcall(P.apply, traceback, def, state, e, ctx)
		if okh and failed_sql then
			-- the handler caught a failed statement and went on, but the
			-- transaction is aborted: treat the event as failed
			okh, res = false, "SQL error (caught by the handler): " .. failed_sql
		end
		if not okh then
			ctx.event = nil
			return handle_failure(def, part, events, i, res)
		end
		state = res
	end
	ctx.event = nil

	local n = #events
	if n > 0 then
		local last = events[n]
		ok, err, code = store_checkpoint(def, part, state, last.tx, last.position)
		if not ok then return dberror(def, err, code) end
		last_pos = last.position
	end

	local status = "more"
	local key = def.name .. "\t" .. part
	if limit then
		status = "more"
	elseif n < BATCH then
		if held_back(def) then
			status = "held"
		else
			status = "idle"
			if not caught[key] and def.caught_up then
				local okc, cerr = xpcall(def.caught_up, traceback, ctx)
				if not okc or failed_sql then
					rollback()
					log("error", def.name, "caught_up failed: " .. first_line(cerr or failed_sql))
					return "retry", 0, 1
				end
			end
		end
	end
	ok, err, code = x("COMMIT")
	if not ok then return dberror(def, err, code) end
	db_failures = 0

	if status == "idle" and not caught[key] then
		caught[key] = true
		log("info", def.name, string.format("pos=%d caught up", last_pos))
	elseif n == BATCH then
		caught[key] = nil
		local now = core.monotime()
		if now - (progress_at[def.name] or 0) >= 5 then
			progress_at[def.name] = now
			log("info", def.name, string.format("pos=%d catching up", last_pos))
		end
	end
	return status, n, 0
end

-- ---------------------------------------------------------------------
-- protocol

local function clean(s)
	return (tostring(s):gsub("[\t\n]", " "))
end

local function init(fields)
	dsn = fields[2]
	local paths = {}
	for i = 3, #fields do paths[#paths + 1] = fields[i] end
	local list, errors = loader.load_paths(paths)
	local out = {}
	for _, e in ipairs(errors) do
		log("error", "host", "projection not loaded: " .. e)
		out[#out + 1] = "error\t" .. clean(e)
	end
	defs = {}
	for _, def in ipairs(list) do
		if def.partition then
			local e = def.file .. ": partition = '" .. def.partition .. "' is not supported by this host yet"
			log("error", def.name, e)
			out[#out + 1] = "error\t" .. clean(e)
		else
			compile(def)
			defs[def.name] = def
			local kind = def.from.all and "all" or def.from.stream and "stream" or "category"
			local value = def.from.stream or def.from.category or ""
			out[#out + 1] = table.concat({ "proj", def.name, kind, clean(value), "0" }, "\t")
		end
	end
	out[#out + 1] = "ready"
	return table.concat(out, "\n")
end

function M.handle(msg)
	local f = {}
	for field in (msg .. "\t"):gmatch("([^\t]*)\t") do f[#f + 1] = field end
	local verb = f[1]
	if verb == "job" then
		local name, part = f[2], f[3] or ""
		local def = defs[name]
		local status, n, delay
		if not def then
			status, n, delay = "failed", 0, 0
		else
			status, n, delay = run_batch(def, part)
		end
		return string.format("done\t%s\t%s\t%s\t%d\t%.3f", name, part, status, n or 0, delay or 0)
	elseif verb == "init" then
		return init(f)
	elseif verb == "quit" then
		rollback()
		return nil
	end
	error("unknown verb from the master: " .. tostring(verb))
end

function M.main()
	return core.serve(3, M.handle)
end

return M
