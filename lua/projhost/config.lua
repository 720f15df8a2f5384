-- projhost.config: every PROJHOST_* environment variable, the one place
-- each is read, with its default and what it does. A value is read once
-- (the first get) and kept; one that does not parse as its kind counts as
-- unset, so a typo falls back to the default instead of half-working - and
-- says so on stderr, naming the variable, the value and the default.
--
--   local config = require "projhost.config"
--   config.get("PROJHOST_BATCH_SIZE")              -- 1000 unless set
--   config.read("PROJHOST_DB", getenv)             -- uncached, another getenv (specs)
--
-- PROJHOST_LUADIR is the exception: the binary reads it before any Lua
-- runs (core/bindings/main.c), so it is listed here only to be documented.
local M = {}

local function number(lo, hi, integer)
	return function(s)
		local n = tonumber(s)
		if not n or n ~= n or n < lo or n > hi or (integer and n % 1 ~= 0) then return nil end
		return n
	end
end

local function text(s)
	if s == "" then return nil end
	return s
end

-- name -> { default, parse(string) -> value | nil, doc }
M.VARS = {
	PROJHOST_DB = { nil, text,
		"connection string of the event store (libpq DSN or URI); else libpq's PG* variables, else the embedded cluster" },
	PROJHOST_HOME = { ".projhost", text,
		"directory of the embedded PostgreSQL cluster (data, socket, log)" },
	PROJHOST_PGBIN = { nil, text,
		"directory holding PostgreSQL's pg_ctl and initdb for the embedded cluster; "
			.. "else pg_config's, Debian's newest, PATH" },
	PROJHOST_PG_OPTS = { nil, text,
		"extra server options for the embedded cluster (pg_ctl -o, split into words by its shell)" },
	PROJHOST_POLL_INTERVAL = { 5, number(0.001, 86400),
		"seconds between the host's fallback polls (a lost NOTIFY only delays an event this long)" },
	PROJHOST_BUDGET = { 30, number(0, 86400),
		"seconds any projection code may run per call unless its options.budget says otherwise (0: no limit)" },
	PROJHOST_BATCH_SIZE = { 1000, number(1, 1000000, true),
		"events a batch reads at most (one transaction)" },
	PROJHOST_STATEMENT_TIMEOUT = { "60s", text,
		"statement_timeout of the workers' sessions (PostgreSQL syntax)" },
	PROJHOST_SYNCHRONOUS_COMMIT = { false, function(s) return s == "on" end,
		"'on': every batch waits for its commit's WAL flush; else catch-up batches do not (the last one does)" },
	PROJHOST_DEBUG = { false, function(s) return s ~= "" end,
		"set (to anything): log debug records too" },
	PROJHOST_LOG_FORMAT = { "text", function(s) return (s == "text" or s == "json") and s or nil end,
		"'text' (lines for people) or 'json' (one JSON object a line, for log shippers): "
			.. "the format of every log line (core/log.h)" },
	PROJHOST_WORKER_MEMORY_MB = { 1024, number(0, 1048576, true),
		"address space a worker may allocate, in MB (RLIMIT_DATA; 0: no limit)" },
	PROJHOST_STALL_AFTER = { 60, number(0, 86400 * 365),
		"seconds a projection with events behind may go without its checkpoint moving before it counts as stalled" },
	PROJHOST_HTTP = { nil, text,
		"host:port the master serves HTTP on (/metrics, /health/live, /health/ready, /status, /, /wait); "
			.. "`run --http` overrides it; unset: no HTTP" },
	PROJHOST_LUADIR = { nil, text,
		"directory of the Lua library the binary loads (read by the binary itself, before Lua)" },
}

local cache = {}

--- The value of name as getenv (default os.getenv) gives it, parsed, or
--- its default; warn(text) hears of a value that was set but did not parse
--- (an empty one counts as unset). Raises for a name that is not in VARS
--- (a programmer error).
function M.read(name, getenv, warn)
	local var = M.VARS[name]
	if not var then error("projhost.config: unknown variable " .. tostring(name), 2) end
	local s = (getenv or os.getenv)(name)
	local v
	if s ~= nil then v = var[2](s) end
	if v == nil and s ~= nil and s ~= "" and warn then
		warn(("%s=%s is not valid (%s); using %s"):format(name, s, var[3], tostring(var[1])))
	end
	if v == nil then v = var[1] end
	return v
end

-- a line on stderr, or a log record when the log is for machines (a
-- PROJHOST_LOG_FORMAT=json reader expects nothing but JSON lines)
local function warn(msg)
	local core = require "projhost.core"
	if core.log_format() == "json" then return core.log("warn", "host", msg) end
	io.stderr:write("projhost: ", core.escape(msg), "\n")
end

--- M.read(name), read once per process.
function M.get(name)
	local box = cache[name]
	if not box then
		box = { M.read(name, nil, warn) }
		cache[name] = box
	end
	return box[1]
end

return M
