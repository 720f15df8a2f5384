-- projhost.embedded: the embedded default cluster and DSN resolution.
--
-- Layout under $PROJHOST_HOME (default ./.projhost, made absolute):
--   data/                PGDATA
--   run/                 unix socket directory (no TCP: listen_addresses='')
--   log/postgresql.log   server log
--
-- embedded.start(home?)  -> dsn, started_now | nil, msg
-- embedded.stop(home?)   -> true, was_running | nil, msg
-- embedded.status(home?) -> "running" | "stopped" | "absent", dsn
-- embedded.dsn(home?)    -> dsn (does not start anything)
-- embedded.resolve(opts) -> dsn, is_embedded | nil, msg
--
-- initdb refuses to run as root, so as root every PostgreSQL program runs
-- as `nobody` via runuser(1) and the directories are chowned to it.
local lfs = require "lfs"

local M = {}

M.PORT = 5432
M.USER = "projhost"
M.DBNAME = "projhost"
-- sockaddr_un.sun_path is 108 bytes including the terminating NUL.
local SUN_PATH_MAX = 107

local function quote(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Run a shell command; returns exit code, combined output.
local function sh(cmd)
	local p = io.popen("(" .. cmd .. ") 2>&1; echo \"@rc=$?\"")
	local out = p:read("*a")
	p:close()
	local body, rc = out:match("^(.-)@rc=(%d+)%s*$")
	return tonumber(rc) or 255, body or out
end

-- The line of a program's output that says what went wrong: initdb and
-- pg_ctl end with hints ("Examine the log output."), not with the reason.
local function last_line(text)
	local last, best
	for line in text:gmatch("[^\n]+") do
		if line:match("%S") then last = line end
		if not best and (line:match("error:") or line:match("FATAL:") or line:match("could not")
			or line:match("cannot")) then
			best = line
		end
	end
	return best or last or "(no output)"
end

local ffi = require "ffi"
ffi.cdef [[
unsigned int geteuid(void);
int open(const char *path, int flags, unsigned int mode);
int flock(int fd, int op);
int close(int fd);
]]
local O_RDWR, O_CREAT, O_CLOEXEC, LOCK_EX = 2, 64, 524288, 2

local function is_root()
	return ffi.C.geteuid() == 0
end

local function absolute(path)
	if path:sub(1, 1) == "/" then return path end
	local cwd = assert(lfs.currentdir())
	path = path:gsub("^%./", "")
	if path == "." or path == "" then return cwd end
	return cwd .. "/" .. path
end

-- The cluster home: explicit argument, else $PROJHOST_HOME, else ./.projhost.
function M.home(home)
	home = home or os.getenv("PROJHOST_HOME")
	if not home or home == "" then home = ".projhost" end
	return (absolute(home):gsub("/+$", ""))
end

local function paths(home)
	home = M.home(home)
	return {
		home = home,
		data = home .. "/data",
		run = home .. "/run",
		logdir = home .. "/log",
		log = home .. "/log/postgresql.log",
	}
end

-- Directory with initdb/pg_ctl: $PROJHOST_PGBIN, pg_config --bindir, or the
-- newest /usr/lib/postgresql/*/bin.
local function pgbin()
	local env = os.getenv("PROJHOST_PGBIN")
	if env and env ~= "" then
		if lfs.attributes(env .. "/pg_ctl", "mode") then return env end
		return nil, "PROJHOST_PGBIN=" .. env .. " has no pg_ctl in it"
	end
	local rc, out = sh("pg_config --bindir")
	local dir = rc == 0 and out:match("^%s*(.-)%s*$")
	if dir and lfs.attributes(dir .. "/initdb", "mode") then return dir end
	local best, best_v
	local listed, iter, state = pcall(lfs.dir, "/usr/lib/postgresql")
	for entry in (listed and iter or function() end), state do
		local v = tonumber(entry)
		if v and lfs.attributes("/usr/lib/postgresql/" .. entry .. "/bin/initdb", "mode")
			and (not best_v or v > best_v) then
			best, best_v = "/usr/lib/postgresql/" .. entry .. "/bin", v
		end
	end
	if best then return best end
	return nil, "cannot find the PostgreSQL server programs (initdb, pg_ctl): "
		.. "install postgresql or set PROJHOST_PGBIN to their directory"
end

-- libpq conninfo value: quote when it holds spaces, quotes or backslashes.
local function conninfo_value(v)
	if v ~= "" and not v:find("[%s'\\]") then return v end
	return "'" .. v:gsub("\\", "\\\\"):gsub("'", "\\'") .. "'"
end

function M.dsn(home)
	local p = paths(home)
	return ("host=%s port=%d dbname=%s user=%s"):format(conninfo_value(p.run), M.PORT, M.DBNAME, M.USER)
end

local function mkdir_p(dir)
	local rc, out = sh("mkdir -p " .. quote(dir))
	if rc ~= 0 then return nil, last_line(out) end
	return true
end

-- Prefix that runs a PostgreSQL program as the cluster's owner, from a
-- directory that owner can enter (postgres complains about an unreadable cwd).
local function runner(p)
	if is_root() then
		return "cd " .. quote(p.home) .. " && runuser -u nobody -- "
	end
	return "cd " .. quote(p.home) .. " && "
end

local function pg_ctl_status(bin, p)
	-- pg_ctl refuses to run as root even for "status", hence runner().
	local rc = sh(runner(p) .. quote(bin .. "/pg_ctl") .. " -D " .. quote(p.data) .. " status")
	-- pg_ctl status: 0 running, 3 not running, 4 no accessible data directory
	return rc == 0
end

function M.status(home)
	local p = paths(home)
	if not lfs.attributes(p.data .. "/PG_VERSION", "mode") then return "absent", M.dsn(home) end
	local bin = pgbin()
	if bin and pg_ctl_status(bin, p) then return "running", M.dsn(home) end
	return "stopped", M.dsn(home)
end

local function prepare_dirs(p)
	for _, d in ipairs({ p.home, p.data, p.run, p.logdir }) do
		local ok, err = mkdir_p(d)
		if not ok then return nil, "cannot create " .. d .. ": " .. err end
	end
	if not is_root() then return true end
	local rc, out = sh("chown nobody " .. quote(p.data) .. " " .. quote(p.run) .. " " .. quote(p.logdir))
	if rc ~= 0 then return nil, "cannot chown the cluster directories to nobody: " .. last_line(out) end
	rc = sh("runuser -u nobody -- test -x " .. quote(p.home) .. " -a -w " .. quote(p.data))
	if rc ~= 0 then
		return nil, ("user nobody (who runs PostgreSQL when projhost runs as root) cannot reach %s: "
			.. "set PROJHOST_HOME to a directory every user can enter, e.g. /tmp/projhost"):format(p.home)
	end
	return true
end

local function ensure_database(p)
	local core = require "projhost.core"
	local admin = M.dsn(p.home):gsub("dbname=%S+", "dbname=postgres")
	local conn, msg = core.connect(admin)
	if not conn then return nil, msg end
	local rows, err, code = conn:query("SELECT 1 AS x FROM pg_database WHERE datname = $1", M.DBNAME)
	if rows and #rows == 0 then
		-- CREATE DATABASE takes no parameters; the name is our constant.
		-- 42P04: a concurrent start created it first, which is fine.
		local ok
		ok, err, code = conn:exec("CREATE DATABASE " .. M.DBNAME)
		if not ok and code ~= "42P04" then rows = nil end
	end
	conn:close()
	if not rows then return nil, "creating database " .. M.DBNAME .. ": " .. err end
	return true
end

-- Run fn() holding an exclusive flock on <home>/.lock, so two commands
-- that start the cluster on first use do not both run initdb.
local function locked(p, fn)
	local ok, err = mkdir_p(p.home)
	if not ok then return nil, "cannot create " .. p.home .. ": " .. err end
	local fd = ffi.C.open(p.home .. "/.lock", O_RDWR + O_CREAT + O_CLOEXEC, tonumber("644", 8))
	if fd >= 0 then ffi.C.flock(fd, LOCK_EX) end
	local r1, r2 = fn()
	if fd >= 0 then ffi.C.close(fd) end
	return r1, r2
end

local start

-- Start the cluster (initdb on first use). Idempotent: a running cluster is
-- fine, and pg_ctl itself deals with a stale postmaster.pid.
function M.start(home)
	local p = paths(home)
	if #(p.run .. "/.s.PGSQL." .. M.PORT) > SUN_PATH_MAX then
		return nil, ("socket path %s/.s.PGSQL.%d is longer than %d bytes: set PROJHOST_HOME to a shorter path")
			:format(p.run, M.PORT, SUN_PATH_MAX)
	end
	return locked(p, function() return start(p) end)
end

function start(p)
	local bin, err = pgbin()
	if not bin then return nil, err end
	local ok
	ok, err = prepare_dirs(p)
	if not ok then return nil, err end
	local as = runner(p)

	if not lfs.attributes(p.data .. "/PG_VERSION", "mode") then
		local rc, out = sh(as .. quote(bin .. "/initdb") .. " -D " .. quote(p.data)
			.. " -U " .. M.USER .. " --auth=trust -E UTF8 --locale=C --no-instructions")
		if rc ~= 0 then return nil, "initdb " .. p.data .. " failed: " .. last_line(out) end
	end

	local started = false
	if not pg_ctl_status(bin, p) then
		-- pg_ctl hands -o to a shell, so the socket dir is quoted inside it.
		local opts = "-c listen_addresses='' -k " .. quote(p.run) .. " -p " .. M.PORT
		local extra = os.getenv("PROJHOST_PG_OPTS")
		if extra and extra ~= "" then opts = opts .. " " .. extra end
		-- setsid: the server leaves our session and process group, so a
		-- Ctrl-C meant for `projhost run` does not shut the cluster down.
		local rc, out = sh(as .. "setsid -w " .. quote(bin .. "/pg_ctl") .. " -D " .. quote(p.data) .. " -l " .. quote(p.log)
			.. " -w -t 60 -o " .. quote(opts) .. " start")
		if rc ~= 0 then
			-- Lost a race with another start: running is all we wanted.
			if not pg_ctl_status(bin, p) then
				return nil, ("cannot start PostgreSQL in %s: %s (see %s)"):format(p.data, last_line(out), p.log)
			end
		else
			started = true
		end
	end
	ok, err = ensure_database(p)
	if not ok then return nil, err end
	return M.dsn(p.home), started
end

-- Stop with -m fast (sessions are disconnected, transactions roll back).
function M.stop(home)
	local p = paths(home)
	if not lfs.attributes(p.data .. "/PG_VERSION", "mode") then return true, false end
	local bin, err = pgbin()
	if not bin then return nil, err end
	if not pg_ctl_status(bin, p) then return true, false end
	local rc, out = sh(runner(p) .. quote(bin .. "/pg_ctl") .. " -D " .. quote(p.data) .. " -m fast -w -t 60 stop")
	if rc ~= 0 and pg_ctl_status(bin, p) then
		return nil, "cannot stop PostgreSQL in " .. p.data .. ": " .. last_line(out)
	end
	return true, true
end

-- The programs that `db psql` runs; PATH first, else the server's bin dir.
function M.psql_path()
	local rc, out = sh("command -v psql")
	if rc == 0 then return (out:match("^%s*(.-)%s*$")) end
	local bin = pgbin()
	return bin and bin .. "/psql" or "psql"
end

local LIBPQ_VARS = { "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE" }

-- Design §4: --db, else PROJHOST_DB, else libpq's own variables, else the
-- embedded default (started on demand). opts.db is the --db value;
-- opts.getenv replaces os.getenv (tests); opts.home the embedded home;
-- opts.on_start(dsn, home) is told when this call started the cluster.
function M.resolve(opts)
	opts = opts or {}
	local getenv = opts.getenv or os.getenv
	if opts.db then return opts.db, false end
	local env = getenv("PROJHOST_DB")
	if env and env ~= "" then return env, false end
	for _, name in ipairs(LIBPQ_VARS) do
		local v = getenv(name)
		if v and v ~= "" then return "", false end
	end
	local dsn, started = M.start(opts.home)
	if not dsn then return nil, "embedded PostgreSQL: " .. started end
	if started and opts.on_start then opts.on_start(dsn, M.home(opts.home)) end
	return dsn, true
end

return M
