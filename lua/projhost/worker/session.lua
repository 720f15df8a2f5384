-- The worker's session: the connection (connect, our session settings,
-- reconnect with backoff), our own statements (not a handler's), and what
-- a failure of them does to the batch (dberror). Errors come back as
-- values; error values of any kind become text here (errtext).
local core = require "projhost.core"
local config = require "projhost.config"
local guard = require "projhost.guard"
local reads = require "projhost.reads"
local S = require "projhost.worker.state"

local M = {}
local of = S.of
local planner_session = S.planner_session

-- runaway SQL (libpq syntax: "30s", "2min", or ms)
local STATEMENT_TIMEOUT = config.get("PROJHOST_STATEMENT_TIMEOUT")

-- log(level, who, msg [, fields]): one log record (core/log.h); fields
-- = { position =, stream =, version = } of the event it is about, passed
-- as data (a json line carries each as a field; a text line shows the
-- position as "pos=N "), never written into msg.
local function log(level, who, msg, fields)
	core.log(level, who, msg, fields)
end
M.log = log

-- The fields of event e for log(): read raw and kept only when they are
-- what the store gives (a handler may have changed its e), so a log call
-- about an event never fails because of it.
local function event_fields(e)
	if type(e) ~= "table" then return nil end
	local p, s, v = rawget(e, "position"), rawget(e, "stream"), rawget(e, "version")
	local function int(x)
		if type(x) == "number" and x == x and x % 1 == 0 and x >= -2 ^ 63 and x < 2 ^ 63 then return x end
	end
	-- (a timer's position is the host's name for it, not a position)
	if rawget(e, "timer") then p = nil end
	return { position = int(p), stream = type(s) == "string" and s or nil, version = int(v) }
end
M.event_fields = event_fields

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
M.STATEMENT_TIMEOUT, M.SESSION_SQL, M.SESSION_PARAMS = STATEMENT_TIMEOUT, SESSION_SQL, SESSION_PARAMS

-- An error value as text, whatever the script raised (a table whose
-- __tostring raises or loops included: see guard.errtext).
local function errtext(v)
	if type(v) == "string" then return v end
	return guard.errtext(v)
end

local function first_line(s)
	return (errtext(s):match("^[^\n]*"))
end
M.errtext, M.first_line = errtext, first_line

local function drop_conn()
	if S.conn then S.conn:close() end
	S.conn = nil
	S.setup_done = {}
	for _, def in pairs(S.defs) do of(def).ok_at = nil end
end
M.drop_conn = drop_conn

local function ensure_conn()
	if S.conn and S.conn:ok() then return true end
	drop_conn()
	local c, err = core.connect(S.dsn)
	if not c then
		-- once per outage, not once per attempt
		if not S.db_down then
			log("error", "worker", "database unreachable: " .. err .. "; retrying with backoff")
			S.db_down = true
		end
		return nil, err
	end
	if S.db_down then log("info", "worker", "database reachable again") end
	S.db_down = false
	S.conn = c
	-- how rows become events: the binding knows no column of the store
	S.conn:event_fields(reads.EVENT_FIELDS)
	-- the master hands it to the next worker if this one dies (see end_orphan)
	core.beat_backend(S.conn:pid() or 0)
	for _, kv in ipairs(SESSION) do
		local ok, serr = S.conn:exec("SELECT set_config($1, $2, false)", kv[1], kv[2])
		if not ok then log("warn", "worker", kv[1] .. " = " .. kv[2] .. ": " .. serr) end
	end
	-- what the reads' planner settings are set back to (projhost.reads)
	local rows = S.conn:query(reads.SESSION_SQL)
	for i, name in ipairs(reads.PLANNER) do planner_session[i] = rows and rows[1][name] or "on" end
	return true
end
M.ensure_conn = ensure_conn

-- Run a statement of our own (not a handler's); errors come back as values.
local function q(sql, ...)
	return S.conn:query(sql, ...)
end

local function x(sql, ...)
	return S.conn:exec(sql, ...)
end

local function rollback()
	local conn = S.conn
	if conn and conn:ok() and conn:in_transaction() then conn:exec("ROLLBACK") end
end
M.q, M.x, M.rollback = q, x, rollback

-- Did the current event fail because the database went away (connection
-- lost, server shutting down) rather than because of the event? Then it
-- is not the event's fault: the batch is redone, nothing counted against it.
-- (57014, a statement timeout, is the event's own doing.)
local function db_fault(code)
	if not S.conn or not S.conn:ok() then return true end
	return code ~= nil and (code:match("^08") ~= nil or code:match("^57P") ~= nil)
end
M.db_fault = db_fault

-- A worker that died (killed past its budget, mostly) may have left its
-- backend running a statement of the batch - a pg_sleep after SET LOCAL
-- statement_timeout = 0 - that still holds the batch's row locks: end it
-- before the batch runs again. Only a backend of a projhost worker, and
-- never our own.
local function end_orphan(pid)
	if not pid or pid <= 0 or not ensure_conn() then return end
	local rows = q([[SELECT pg_terminate_backend(pid, 5000) AS ended FROM pg_stat_activity
		WHERE pid = $1 AND application_name = 'projhost worker' AND pid <> pg_backend_pid()]], pid)
	if rows and rows[1] then log("info", "worker", "ended backend " .. pid .. " of the worker that died") end
end

local function backoff()
	S.db_failures = S.db_failures + 1
	return math.min(0.25 * 2 ^ (S.db_failures - 1), 30)
end

-- Our own statement failed (connection lost, deadlock, server restart):
-- the batch rolled back; the master runs it again after a growing delay.
local function dberror(def, err, code)
	rollback()
	if S.conn and not S.conn:ok() then drop_conn() end
	if S.db_failures == 0 or not S.db_down then
		log("warn", of(def).cp, "batch rolled back: " .. errtext(err) .. (code and (" [" .. code .. "]") or ""))
	end
	return backoff()
end
M.end_orphan = end_orphan
M.backoff, M.dberror = backoff, dberror

return M
