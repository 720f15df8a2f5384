-- projhost.embedded: the embedded default cluster and DSN resolution.
--
-- Layout under $PROJHOST_HOME (default ./.projhost, made absolute):
--   data/                PGDATA; data/projhost.conf holds the settings
--                        below and is rewritten on every start
--   run/                 unix socket directory, mode 0700 (no TCP)
--   log/postgresql.log   server log (log/ is 0700 too)
--
-- embedded.start(home?)     -> dsn, started_now | nil, msg
-- embedded.stop(home?)      -> true, was_running | nil, msg
-- embedded.status(home?)    -> "running" | "stopped" | "absent", dsn
-- embedded.dsn(home?)       -> dsn of M.USER (does not start anything)
-- embedded.admin_dsn(home?) -> dsn of M.ADMIN, the superuser
-- embedded.resolve(opts)    -> dsn, is_embedded | nil, msg
--
-- Privileges (README "Security model"): M.ADMIN is the cluster's bootstrap
-- superuser and only this file uses it, to create and upgrade. Everything
-- else - db url, db psql, run, append, so all projection SQL - connects as
-- M.USER: not a superuser (no COPY ... PROGRAM, no server files, no ALTER
-- SYSTEM), owner of database M.DBNAME, CREATEDB (throwaway databases for
-- tests), member of pg_read_all_stats (status names the transaction that
-- holds the horizon back, whoever runs it) and of pg_checkpoint (PostgreSQL
-- 15 on: CHECKPOINT, which `make bench` runs). Authentication is trust, so
-- the socket is the gate: only over it (listen_addresses = ''), and only
-- for the OS user who runs the cluster (directory and socket 0700).
-- A cluster made before M.ADMIN existed (M.USER was its superuser) is
-- upgraded in place by the next start (upgrade_legacy below).
--
-- No shell: programs run through projhost.proc (posix_spawn) with argument
-- vectors, so a home holding $(...), quotes or spaces is used literally.
-- pg_ctl itself starts postgres through /bin/sh with -D and -l in double
-- quotes, so it gets paths relative to the home (its working directory)
-- and a bin directory without characters special in double quotes.
--
-- initdb refuses to run as root, so as root every PostgreSQL program runs
-- as `nobody` via runuser(1) and the directories are chowned to it
-- (core.chown). Processes, modes and owners come from projhost.core, the
-- lock and directories from lua-filesystem: no libc declared here.
local lfs = require "lfs"
local proc = require "projhost.proc"
local config = require "projhost.config"

local M = {}

M.PORT = 5432
M.USER = "projhost"
M.ADMIN = "projhost_admin"
M.DBNAME = "projhost"
-- a superuser that exists only in the middle of upgrade_legacy
local UPGRADE_ROLE = "projhost_upgrade"
-- sockaddr_un.sun_path is 108 bytes including the terminating NUL.
local SUN_PATH_MAX = 107

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

local core = require "projhost.core"
local MODE_0700 = tonumber("700", 8)

local function is_root()
	return core.geteuid() == 0
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
	home = home or config.get("PROJHOST_HOME")
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

-- The same places relative to the home, for pg_ctl's shell (see the top).
local REL_DATA, REL_LOG = "data", "log/postgresql.log"

-- A program on $PATH (then the usual system directories), or nil.
local function find_program(name)
	local dirs = (os.getenv("PATH") or "") .. ":/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
	for dir in dirs:gmatch("[^:]+") do
		local full = dir .. "/" .. name
		local perm = lfs.attributes(full, "permissions")
		if perm and perm:find("x") and lfs.attributes(full, "mode") == "file" then return full end
	end
	return nil
end

local function environment()
	local env = {}
	for i, kv in ipairs(proc.environ()) do env[i] = kv[1] .. "=" .. kv[2] end
	return env
end

-- Run prog with args (no shell): exit code, combined output. opts.cwd;
-- opts.owner runs it as the cluster's owner (`nobody` when we are root).
local function run(prog, args, opts)
	opts = opts or {}
	if opts.owner and is_root() then
		local runuser = find_program("runuser")
		if not runuser then return 127, "cannot find runuser(1), needed to run " .. prog .. " as nobody" end
		local wrapped = { "-u", "nobody", "--", prog }
		for _, a in ipairs(args) do wrapped[#wrapped + 1] = a end
		prog, args = runuser, wrapped
	end
	local out = os.tmpname()
	local ok, pid = pcall(proc.spawn, prog, args, environment(), { stdout = out, stderr = out, cwd = opts.cwd })
	if not ok then
		os.remove(out)
		return 127, tostring(pid)
	end
	local code = proc.wait(pid, opts.timeout or 300)
	if not code then
		require("projhost.core").kill(pid, 9)
		proc.wait(pid, 5)
		code = 124
	end
	local f = io.open(out, "rb")
	local text = f and f:read("*a") or ""
	if f then f:close() end
	os.remove(out)
	if code == 124 then text = text .. "\n" .. prog .. " did not finish in time" end
	return code, text
end

-- Directory with initdb/pg_ctl: $PROJHOST_PGBIN, pg_config --bindir, or the
-- newest /usr/lib/postgresql/*/bin.
local function find_pgbin()
	local env = config.get("PROJHOST_PGBIN")
	if env then
		if lfs.attributes(env .. "/pg_ctl", "mode") then return env end
		return nil, "PROJHOST_PGBIN=" .. env .. " has no pg_ctl in it"
	end
	local pg_config = find_program("pg_config")
	if pg_config then
		local rc, out = run(pg_config, { "--bindir" })
		local dir = rc == 0 and out:match("^%s*(.-)%s*$")
		if dir and lfs.attributes(dir .. "/initdb", "mode") then return dir end
	end
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

local function pgbin()
	local bin, err = find_pgbin()
	if bin and bin:find('["$`\\%c]') then
		return nil, ("the PostgreSQL bin directory %q holds a character that pg_ctl's shell would interpret "
			.. "(\" $ ` \\ or a control character): set PROJHOST_PGBIN to a plain path (a symlink will do)"):format(bin)
	end
	return bin, err
end

-- libpq conninfo value: quote when it holds spaces, quotes or backslashes.
local function conninfo_value(v)
	if v ~= "" and not v:find("[%s'\\]") then return v end
	return "'" .. v:gsub("\\", "\\\\"):gsub("'", "\\'") .. "'"
end

local function dsn_of(p, user, dbname)
	return ("host=%s port=%d dbname=%s user=%s"):format(conninfo_value(p.run), M.PORT, dbname, user)
end

function M.dsn(home)
	return dsn_of(paths(home), M.USER, M.DBNAME)
end

function M.admin_dsn(home)
	return dsn_of(paths(home), M.ADMIN, M.DBNAME)
end

local function mkdir_p(dir)
	local path = ""
	for part in dir:gmatch("[^/]+") do
		path = path .. "/" .. part
		if not lfs.attributes(path, "mode") then
			local ok, err = lfs.mkdir(path)
			if not ok and not lfs.attributes(path, "mode") then return nil, err end
		end
	end
	return true
end

local function chmod_700(path)
	local ok, err = core.chmod(path, MODE_0700)
	if not ok then return nil, ("cannot chmod 700 %s: %s"):format(path, err) end
	return true
end

-- pg_ctl as the cluster's owner (it refuses root even for "status"), from
-- the home: paths are relative to it (see the top).
local function pg_ctl(bin, p, args, timeout)
	return run(bin .. "/pg_ctl", args, { owner = true, cwd = p.home, timeout = timeout })
end

local function pg_ctl_status(bin, p)
	-- pg_ctl status: 0 running, 3 not running, 4 no accessible data directory
	return (pg_ctl(bin, p, { "-D", REL_DATA, "status" })) == 0
end

function M.status(home)
	local p = paths(home)
	if not lfs.attributes(p.data .. "/PG_VERSION", "mode") then return "absent", M.dsn(home) end
	local bin = pgbin()
	if bin and pg_ctl_status(bin, p) then return "running", M.dsn(home) end
	return "stopped", M.dsn(home)
end

-- Create the directories and (again on every start, so an older home is
-- mended too) give run/ and log/ to the cluster's owner alone.
local function prepare_dirs(p)
	for _, d in ipairs({ p.home, p.data, p.run, p.logdir }) do
		local ok, err = mkdir_p(d)
		if not ok then return nil, "cannot create " .. d .. ": " .. err end
	end
	if is_root() then
		for _, d in ipairs({ p.data, p.run, p.logdir }) do
			local ok, err = core.chown(d, "nobody")
			if not ok then return nil, "cannot chown the cluster directories to nobody: " .. d .. ": " .. err end
		end
		local test = find_program("test")
		local rc = test and run(test, { "-x", p.home, "-a", "-w", p.data }, { owner = true }) or 1
		if rc ~= 0 then
			return nil, ("user nobody (who runs PostgreSQL when projhost runs as root) cannot reach %s: "
				.. "set PROJHOST_HOME to a directory every user can enter, e.g. /tmp/projhost"):format(p.home)
		end
	end
	for _, d in ipairs({ p.run, p.logdir }) do
		local ok, err = chmod_700(d)
		if not ok then return nil, err end
	end
	return true
end

-- A string in postgresql.conf syntax.
local function conf_string(v)
	return "'" .. v:gsub("\\", "\\\\"):gsub("'", "''") .. "'"
end

local INCLUDE_LINE = "include = 'projhost.conf'"

-- The settings projhost relies on, in data/projhost.conf, included from
-- postgresql.conf (the include is added once, also to an older cluster).
-- In a file rather than on pg_ctl's command line: that goes through a
-- shell, and these hold the home's path.
local function write_settings(p)
	local conf = p.data .. "/projhost.conf"
	local f, err = io.open(conf, "wb")
	if not f then return nil, "cannot write " .. err end
	f:write("# Written by projhost on every start (lua/projhost/embedded.lua): edits are lost.\n",
		"# Only the socket, and only for the OS user who runs the cluster: trust\n",
		"# authentication must not reach other local users.\n",
		"listen_addresses = ''\n",
		-- a list: the one element double-quoted, so nothing in it separates
		"unix_socket_directories = ", conf_string('"' .. p.run:gsub('"', '""') .. '"'), "\n",
		"unix_socket_permissions = 0700\n",
		"port = ", tostring(M.PORT), "\n")
	f:close()
	local main = p.data .. "/postgresql.conf"
	f, err = io.open(main, "rb")
	if not f then return nil, "cannot read " .. err end
	local text = f:read("*a")
	f:close()
	if not text:find("\n" .. INCLUDE_LINE .. "\n", 1, true) then
		f, err = io.open(main, "ab")
		if not f then return nil, "cannot write " .. err end
		f:write("\n# projhost: the settings it relies on (rewritten on every start)\n", INCLUDE_LINE, "\n")
		f:close()
	end
	if is_root() then
		local ok, why = core.chown(conf, "nobody")
		if not ok then return nil, "cannot chown " .. conf .. " to nobody: " .. why end
	end
	return true
end

-- Roles, database and ownership, as the top describes; idempotent and run
-- on every start, so it also finishes an upgrade that was interrupted.
-- Runs as M.ADMIN in M.DBNAME. The names are our constants (identifiers
-- cannot be parameters).
local ENSURE_SQL = ([=[
DO $do$
DECLARE
	r record;
BEGIN
	IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '@USER@') THEN
		CREATE ROLE @USER@ LOGIN CREATEDB;
	END IF;
	IF EXISTS (SELECT FROM pg_roles WHERE rolname = '@USER@' AND (rolsuper OR rolcreaterole
		OR rolreplication OR rolbypassrls OR NOT rolcanlogin OR NOT rolcreatedb)) THEN
		ALTER ROLE @USER@ NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS LOGIN CREATEDB;
	END IF;
	IF NOT pg_has_role('@USER@', 'pg_read_all_stats', 'MEMBER') THEN
		GRANT pg_read_all_stats TO @USER@;
	END IF;
	-- PostgreSQL 15 on; `make bench` checkpoints between its loads
	IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'pg_checkpoint')
		AND NOT pg_has_role('@USER@', 'pg_checkpoint', 'MEMBER') THEN
		GRANT pg_checkpoint TO @USER@;
	END IF;
	IF EXISTS (SELECT FROM pg_roles WHERE rolname = '@UPGRADE@') THEN
		DROP ROLE @UPGRADE@;
	END IF;
	IF (SELECT datdba FROM pg_database WHERE datname = current_database()) <> '@USER@'::regrole THEN
		ALTER DATABASE @DB@ OWNER TO @USER@;
	END IF;
	-- What the superuser owns here was made when it was the role everything
	-- ran as (an older cluster): schemas, tables, views, sequences of their
	-- own (owned ones follow their table), routines and types.
	FOR r IN
		SELECT format('ALTER SCHEMA %I OWNER TO @USER@', nspname) AS stmt
		FROM pg_namespace n
		WHERE nspowner = '@ADMIN@'::regrole AND nspname !~ '^pg_' AND nspname <> 'information_schema'
		UNION ALL
		SELECT format('ALTER %s %s OWNER TO @USER@', CASE c.relkind WHEN 'v' THEN 'VIEW'
			WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
			ELSE 'TABLE' END, c.oid::regclass)
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.relowner = '@ADMIN@'::regrole AND nspname !~ '^pg_' AND nspname <> 'information_schema'
			AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
			AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
				AND (d.deptype = 'e' OR (c.relkind = 'S' AND d.deptype IN ('a', 'i'))))
		UNION ALL
		SELECT format('ALTER %s %s OWNER TO @USER@', CASE p.prokind WHEN 'p' THEN 'PROCEDURE'
			WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END, p.oid::regprocedure)
		FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE p.proowner = '@ADMIN@'::regrole AND nspname !~ '^pg_' AND nspname <> 'information_schema'
			AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
				AND d.deptype = 'e')
		UNION ALL
		SELECT format('ALTER %s %s OWNER TO @USER@', CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
			t.oid::regtype)
		FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
		WHERE t.typowner = '@ADMIN@'::regrole AND nspname !~ '^pg_' AND nspname <> 'information_schema'
			AND (t.typtype IN ('e', 'r', 'd')
				OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
			AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid
				AND d.deptype = 'e')
	LOOP
		EXECUTE r.stmt;
	END LOOP;
END
$do$]=]):gsub("@(%u+)@", { USER = M.USER, ADMIN = M.ADMIN, DB = M.DBNAME, UPGRADE = UPGRADE_ROLE })

local function exec_all(conn, list)
	for _, sql in ipairs(list) do
		local ok, msg = conn:exec(sql)
		if not ok then return nil, msg end
	end
	return true
end

-- An older cluster: M.USER is its bootstrap superuser and M.ADMIN does not
-- exist. The bootstrap superuser cannot stop being one (PostgreSQL 16 on)
-- and no session can rename its own role, so a passing superuser renames
-- it to M.ADMIN; ENSURE_SQL then makes a new M.USER, gives it what the old
-- one owned, and drops the passing role. Every step is safe to redo.
local function upgrade_legacy(p, legacy)
	local rows = legacy:query("SELECT rolsuper::text AS su FROM pg_roles WHERE rolname = current_user")
	if not rows or rows[1].su ~= "true" then return nil, "role " .. M.USER .. " is not a superuser" end
	local ok, msg = exec_all(legacy, { (([[DO $do$ BEGIN
		IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '@UPGRADE@') THEN
			CREATE ROLE @UPGRADE@ SUPERUSER LOGIN;
		END IF;
	END $do$]]):gsub("@UPGRADE@", UPGRADE_ROLE)) })
	if not ok then return nil, "upgrading the roles: " .. msg end
	local up
	up, msg = core.connect(dsn_of(p, UPGRADE_ROLE, "postgres"))
	if not up then return nil, "upgrading the roles: " .. msg end
	ok, msg = up:exec(("ALTER ROLE %s RENAME TO %s"):format(M.USER, M.ADMIN))
	up:close()
	if not ok then return nil, "upgrading the roles: " .. msg end
	return true
end

-- A superuser session in M.DBNAME, creating the database (and upgrading an
-- older cluster's roles) when needed.
local function connect_admin(p)
	local conn, err = core.connect(dsn_of(p, M.ADMIN, M.DBNAME))
	if conn then return conn end
	local admin = core.connect(dsn_of(p, M.ADMIN, "postgres"))
	if not admin then
		local legacy = core.connect(dsn_of(p, M.USER, "postgres"))
		if not legacy then return nil, err end
		local ok, msg = upgrade_legacy(p, legacy)
		legacy:close()
		if not ok then return nil, msg end
		admin, err = core.connect(dsn_of(p, M.ADMIN, "postgres"))
		if not admin then return nil, err end
	end
	local rows, msg = admin:query("SELECT 1 AS x FROM pg_database WHERE datname = $1", M.DBNAME)
	if rows and #rows == 0 then
		-- 42P04: a concurrent start created it first, which is fine.
		local ok, code
		ok, msg, code = admin:exec("CREATE DATABASE " .. M.DBNAME)
		if not ok and code ~= "42P04" then rows = nil end
	end
	admin:close()
	if not rows then return nil, "creating database " .. M.DBNAME .. ": " .. msg end
	return core.connect(dsn_of(p, M.ADMIN, M.DBNAME))
end

local function ensure_roles(p)
	local conn, err = connect_admin(p)
	if not conn then return nil, err end
	-- "already exists"-style notices would be printed by libpq
	local ok, msg = exec_all(conn, { "SET client_min_messages = warning", ENSURE_SQL })
	conn:close()
	if not ok then return nil, "setting up role " .. M.USER .. ": " .. msg end
	return true
end

-- Run fn() holding an exclusive lock on <home>/.lock (lfs.lock: a POSIX
-- record lock, released when the file closes or the process dies), so two
-- commands that start the cluster on first use do not both run initdb.
-- lfs.lock does not wait, so we do.
local function locked(p, fn)
	local ok, err = mkdir_p(p.home)
	if not ok then return nil, "cannot create " .. p.home .. ": " .. err end
	local f = io.open(p.home .. "/.lock", "a+")
	if f then
		local nap = 0.005
		local got, why = lfs.lock(f, "w")
		-- held by another (EAGAIN, or EACCES on some systems): wait
		while not got and (why:find("unavailable", 1, true) or why:find("denied", 1, true)) do
			core.sleep(nap)
			nap = math.min(nap * 2, 0.2)
			got, why = lfs.lock(f, "w")
		end
	end
	local r1, r2 = fn()
	if f then f:close() end
	return r1, r2
end

local start

-- Start the cluster (initdb on first use). Idempotent: a running cluster is
-- fine, and pg_ctl itself deals with a stale postmaster.pid.
function M.start(home)
	local p = paths(home)
	-- libpq splits host= at commas (a list of hosts), whatever the quoting
	if p.home:find("[%c,]") then
		return nil, "the embedded home's path holds a comma or a control character, which libpq cannot "
			.. "take as a socket directory: set PROJHOST_HOME to another directory"
	end
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

	if not lfs.attributes(p.data .. "/PG_VERSION", "mode") then
		-- --auth-host=reject: TCP is off anyway (listen_addresses = '')
		local rc, out = run(bin .. "/initdb", { "-D", REL_DATA, "-U", M.ADMIN, "--auth-local=trust",
			"--auth-host=reject", "-E", "UTF8", "--locale=C", "--no-instructions" }, { owner = true, cwd = p.home })
		if rc ~= 0 then return nil, "initdb " .. p.data .. " failed: " .. last_line(out) end
	end
	ok, err = write_settings(p)
	if not ok then return nil, err end

	local started = false
	if not pg_ctl_status(bin, p) then
		-- setsid: the server leaves our session and process group, so a
		-- Ctrl-C meant for `projhost run` does not shut the cluster down.
		-- PROJHOST_PG_OPTS are server options for pg_ctl -o (its shell
		-- splits them into words).
		local setsid = find_program("setsid")
		if not setsid then return nil, "cannot find setsid(1), needed to start PostgreSQL in the background" end
		local args = { "-w", bin .. "/pg_ctl", "-D", REL_DATA, "-l", REL_LOG, "-w", "-t", "60" }
		local extra = config.get("PROJHOST_PG_OPTS")
		if extra then
			args[#args + 1] = "-o"
			args[#args + 1] = extra
		end
		args[#args + 1] = "start"
		local rc, out = run(setsid, args, { owner = true, cwd = p.home, timeout = 120 })
		if rc ~= 0 then
			-- Lost a race with another start: running is all we wanted.
			if not pg_ctl_status(bin, p) then
				return nil, ("cannot start PostgreSQL in %s: %s (see %s)"):format(p.data, last_line(out), p.log)
			end
		else
			started = true
		end
	end
	ok, err = ensure_roles(p)
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
	local rc, out = pg_ctl(bin, p, { "-D", REL_DATA, "-m", "fast", "-w", "-t", "60", "stop" }, 120)
	if rc ~= 0 and pg_ctl_status(bin, p) then
		return nil, "cannot stop PostgreSQL in " .. p.data .. ": " .. last_line(out)
	end
	return true, true
end

-- The psql that `db psql` runs; PATH first, else the server's bin dir.
function M.psql_path()
	local found = find_program("psql")
	if found then return found end
	local bin = find_pgbin()
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
	local env = config.read("PROJHOST_DB", getenv)
	if env then return env, false end
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
