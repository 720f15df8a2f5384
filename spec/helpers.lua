-- spec/helpers.lua: shared helpers of the integration specs.
--
--   local h = require "helpers"
--   h.root, h.bin           repository root; binary under test ($PROJHOST_BIN
--                           or <root>/projhost; `make asan` sets the former)
--   h.pg()                  the throwaway cluster of this test process:
--                           { dsn =, home = }, started on first use
--   h.fresh_db(name?)       CREATE DATABASE in it (dropped first); its dsn
--   h.connect(dsn)          core.connect or raise
--   h.run(args, opts)       run the binary: code, stdout, stderr
--   h.spawn(args, opts)     run it in the background: p.pid, p:alive(),
--                           p:kill(sig), p:wait(timeout) -> code|nil, p:output()
--                           (opts: env, cwd, stdin, prefix = { "/usr/bin/prlimit", ... })
--   h.sh_quote(s), h.read_all(cmd)  a shell word; a command's whole output
--   h.tcp_connect(port, rcvbuf?), h.tcp_send(fd, s), h.tcp_recv(fd, timeout),
--   h.tcp_close(fd)         raw TCP clients of 127.0.0.1 (hostile HTTP ones)
--   h.open_files(n)         this process's soft open-files limit (-> the old one)
--   h.projection_db(name, files)  a fresh migrated database and a folder of
--                           projection files { ["x.lua"] = text }: dsn, conn, dir
--   h.ok(args, dsn, opts)   run the binary with --db dsn, assert exit 0: out, err
--   h.stop_all()            kill the children h.spawn started
--   h.wait_until(fn, timeout_s, what)
--   h.scalar(conn, sql, ...) the first column of the first row
--   h.insert_events(conn, prefix, n, streams, type?)  set-based test events
--   h.pgbin(name)           a PostgreSQL program (pgbench, ...)
--   h.c_checks(program, n)  run a C check program of spec/core: n groups pass
--   h.tmpdir(), h.write_file(path, text), h.read_file(path), h.exists(path)
--
-- opts: env (name -> string, or false to unset), stdin (string), cwd,
-- timeout (h.run only; default 120 s, then the child is killed and we raise).
-- Exit codes are the child's, or 128 + signal when a signal ended it.
--
-- Children are started with posix_spawn through LuaJIT's FFI instead of a
-- shell: we are their parent, so waitpid gives real exit codes, and none of
-- them inherits the SIGINT-ignored disposition a shell gives `cmd &`
-- (specs send SIGINT to `projhost run`).
--
-- Cleanup: busted publishes { "exit" } after the suite (we subscribe once),
-- and a __gc sentinel runs again when the host closes the Lua state (also
-- after os.exit(code, true)); whichever runs first kills leftover children,
-- stops the cluster and removes the temp dirs. A SIGKILLed test process
-- leaves /tmp/projhost-spec.* behind.
--
-- State lives in the Lua registry because busted insulates every spec file
-- (package.loaded is restored), which would otherwise reload this module
-- and start one cluster per file.
local core = require "projhost.core"
local proc = require "projhost.proc"

local h = {}

local REG_KEY = "projhost.spec.helpers"
local reg = debug.getregistry()
local state = reg[REG_KEY]
if not state then
	state = { tmpdirs = {}, procs = {}, seq = 0, dbs = {} }
	reg[REG_KEY] = state
end

local function script_dir()
	local src = debug.getinfo(1, "S").source:gsub("^@", "")
	local dir = src:match("^(.*)/[^/]*$") or "."
	if dir:sub(1, 1) ~= "/" then dir = require("lfs").currentdir() .. "/" .. dir end
	return dir
end

h.root = (script_dir():gsub("/%./", "/"):gsub("/spec$", ""))
h.bin = os.getenv("PROJHOST_BIN")
if not h.bin or h.bin == "" then h.bin = h.root .. "/projhost" end

function h.read_file(path)
	local f, err = io.open(path, "rb")
	if not f then error(err, 2) end
	local s = f:read("*a")
	f:close()
	return s
end

function h.write_file(path, text)
	local f, err = io.open(path, "wb")
	if not f then error(err, 2) end
	f:write(text)
	f:close()
	return path
end

-- A fresh directory under /tmp, mode 0755 so `nobody` (who runs the
-- cluster when we are root) can reach it; removed at exit.
function h.tmpdir()
	local dir, err = proc.tmpdir("/tmp/projhost-spec.")
	if not dir then error(err, 2) end
	state.tmpdirs[#state.tmpdirs + 1] = dir
	return dir
end

local function scratch()
	if not state.scratch then state.scratch = h.tmpdir() end
	state.seq = state.seq + 1
	return state.scratch .. "/" .. state.seq
end

-- The environment of a child: ours, minus anything that could point it at
-- a developer's real database, plus opts.env (false unsets).
local CLEARED = { "PROJHOST_DB", "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE",
	"PGPASSWORD", "PGOPTIONS" }

local function child_env(extra)
	local env, order = {}, {}
	for _, kv in ipairs(proc.environ()) do
		local k = kv[1]
		if not env[k] then
			order[#order + 1] = k
			env[k] = kv[2]
		end
	end
	for _, k in ipairs(CLEARED) do env[k] = nil end
	-- A spec that forgets --db lands in the throwaway cluster, never in ./.projhost.
	env.PROJHOST_HOME = state.pg and state.pg.home or (state.scratch or "/tmp") .. "/no-embedded-cluster"
	order[#order + 1] = "PROJHOST_HOME"
	for k, v in pairs(extra or {}) do
		if v == false then env[k] = nil else env[k] = tostring(v) end
		order[#order + 1] = k
	end
	local list, seen = {}, {}
	for _, k in ipairs(order) do
		if env[k] and not seen[k] then
			seen[k] = true
			list[#list + 1] = k .. "=" .. env[k]
		end
	end
	return list
end

-- Start the binary; returns pid. files: stdin, stdout, stderr paths.
-- opts.prefix: a command that runs it ({ "/usr/bin/prlimit", "--nofile=512" }: a path).
local function spawn(args, opts, files)
	files.cwd = opts.cwd
	if opts.prefix then
		local argv = {}
		for i = 2, #opts.prefix do argv[#argv + 1] = opts.prefix[i] end
		argv[#argv + 1] = h.bin
		for _, a in ipairs(args) do argv[#argv + 1] = a end
		return proc.spawn(opts.prefix[1], argv, child_env(opts.env), files)
	end
	return proc.spawn(h.bin, args, child_env(opts.env), files)
end

-- nil while running, else the exit code (128+sig if signalled).
local function reap(pid)
	return (proc.wait(pid, 0))
end

local function wait_code(pid, timeout)
	return (proc.wait(pid, timeout))
end

function h.run(args, opts)
	opts = opts or {}
	local base = scratch()
	local files = { stdout = base .. ".out", stderr = base .. ".err" }
	if opts.stdin then files.stdin = h.write_file(base .. ".in", opts.stdin) end
	local pid = spawn(args, opts, files)
	local timeout = opts.timeout or 120
	local code = wait_code(pid, timeout)
	if not code then
		core.kill(pid, 9)
		wait_code(pid, 5)
		error(("timed out after %ds: projhost %s"):format(timeout, table.concat(args, " ")), 2)
	end
	local out, err = h.read_file(files.stdout), h.read_file(files.stderr)
	os.remove(files.stdout)
	os.remove(files.stderr)
	if files.stdin then os.remove(files.stdin) end
	return code, out, err
end

local Proc = {}
Proc.__index = Proc

function Proc:alive()
	if self.code then return false end
	self.code = reap(self.pid)
	return self.code == nil
end

function Proc:kill(sig)
	if self:alive() then core.kill(self.pid, sig or 15) end
end

function Proc:wait(timeout)
	if self.code then return self.code end
	self.code = wait_code(self.pid, timeout or 30)
	return self.code
end

function Proc:output()
	local f = io.open(self.log, "rb")
	if not f then return "" end
	local s = f:read("*a")
	f:close()
	return s
end

function h.spawn(args, opts)
	opts = opts or {}
	local log = scratch() .. ".log"
	-- stdout and stderr share one file description (dup2), like 2>&1
	local files = { stdout = log, stderr = log }
	if opts.stdin then files.stdin = h.write_file(log .. ".in", opts.stdin) end
	local p = setmetatable({ log = log, args = args }, Proc)
	p.pid = spawn(args, opts, files)
	state.procs[#state.procs + 1] = p
	return p
end

function h.wait_until(fn, timeout, what)
	timeout = timeout or 10
	local deadline = core.monotime() + timeout
	while true do
		local v = fn()
		if v then return v end
		if core.monotime() >= deadline then
			error(("timed out after %gs waiting for %s"):format(timeout, what or "a condition"), 2)
		end
		core.sleep(0.05)
	end
end

-- The first column of the first row of a query (text), or nil.
function h.scalar(conn, sql, ...)
	local rows, err = conn:query(sql, ...)
	if not rows then error(err, 2) end
	local _, v = next(rows[1] or {})
	return v
end

-- A PostgreSQL program (pgbench, pg_ctl, ...) from the server's bin dir.
-- n events of type etype (default "Inc") over `streams` streams named
-- PREFIX-0, PREFIX-1, ..., with data {"amount": i % 7}, written with
-- set-based SQL (thousands in milliseconds, where appends take seconds) and
-- with their projhost.streams rows, as projhost.append would leave them.
function h.insert_events(conn, prefix, n, streams, etype)
	assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
		SELECT $1 || '-' || (i % $3), i / $3 + 1, $4, jsonb_build_object('amount', i % 7)
		FROM generate_series(0, $2 - 1) i]], prefix, n, streams, etype or "Inc"))
	assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position, updated_at)
		SELECT stream_id, max(stream_version), max(global_position), now() FROM projhost.events
		WHERE stream_id LIKE $1 || '-%' GROUP BY 1
		ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version,
			last_position = EXCLUDED.last_position, updated_at = EXCLUDED.updated_at]], prefix))
end

-- Run a C check program of spec/core (built next to the objects of the
-- binary under test) and assert it passed its `expected` groups of checks.
function h.c_checks(program, expected)
	local assert = require "luassert"
	local dir = h.bin:find("build%-asan") and "build-asan" or "build"
	local p = io.popen(h.root .. "/" .. dir .. "/" .. program .. " 2>&1; echo \"exit=$?\"")
	local out = p:read("*a")
	p:close()
	assert.matches("exit=0", out, 1, true)
	local oks = 0
	for line in out:gmatch("[^\n]+") do
		if line:match("^ok ") then oks = oks + 1 end
	end
	assert.equal(expected, oks, out)
end

function h.pgbin(name)
	local p = io.popen("pg_config --bindir 2>/dev/null")
	local dir = p and p:read("*l")
	if p then p:close() end
	if not dir or dir == "" then
		p = io.popen("ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1")
		dir = p:read("*l")
		p:close()
	end
	return dir .. "/" .. name
end

function h.connect(dsn)
	local conn, msg = core.connect(dsn)
	if not conn then error(msg, 2) end
	return conn
end

-- Stop every process h.spawn started (SIGTERM, then SIGKILL after 5 s).
-- Spec files call it in after_each: a host left over from a failed test
-- would otherwise process the next test's database of the same name.
function h.stop_all()
	for _, p in ipairs(state.procs) do
		if p:alive() then
			p:kill(15)
			if not p:wait(5) then
				core.kill(p.pid, 9)
				p:wait(5)
			end
		end
	end
	state.procs = {}
end

local function cleanup()
	if state.cleaned then return end
	state.cleaned = true
	h.stop_all()
	if state.pg then
		local code, _, err = h.run({ "db", "stop" }, { env = { PROJHOST_HOME = state.pg.home } })
		if code ~= 0 then io.stderr:write("spec/helpers: stopping the test cluster: ", err) end
	end
	for _, d in ipairs(state.tmpdirs) do
		if d:match("^/tmp/projhost%-spec%.") then os.execute("rm -rf '" .. d .. "'") end
	end
end

local function arm_cleanup()
	if state.armed then return end
	state.armed = true
	local ok, busted = pcall(require, "busted")
	if ok and type(busted) == "table" and busted.subscribe then
		busted.subscribe({ "exit" }, function()
			cleanup()
			return nil, true
		end)
	end
	local sentinel = newproxy(true)
	getmetatable(sentinel).__gc = cleanup
	state.sentinel = sentinel
end

-- server options for every throwaway cluster: durability is not what specs test
local PG_OPTS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
h.PG_OPTS = PG_OPTS

-- Whether anything (file, directory, socket) is at path.
function h.exists(path)
	return require("lfs").attributes(path, "mode") ~= nil
end

function h.pg()
	if state.pg then return state.pg end
	arm_cleanup()
	local home = h.tmpdir()
	local env = { PROJHOST_HOME = home, PROJHOST_PG_OPTS = PG_OPTS }
	local code, _, err = h.run({ "db", "start" }, { env = env })
	if code ~= 0 then error("starting the test cluster in " .. home .. " failed: " .. err, 2) end
	state.pg = { home = home }
	local out
	code, out, err = h.run({ "db", "url" }, { env = env })
	if code ~= 0 then error("projhost db url failed: " .. err, 2) end
	state.pg.dsn = out:match("^%s*(.-)%s*$")
	return state.pg
end

local function default_db_name()
	-- named after the calling spec file, e.g. append_spec.lua -> append
	for level = 3, 6 do
		local info = debug.getinfo(level, "S")
		local base = info and info.source:match("([%w_]+)_spec%.lua$")
		if base then return base:lower() end
	end
	return "spec"
end

function h.fresh_db(name)
	local pg = h.pg()
	name = name or default_db_name()
	if not name:match("^[a-z_][a-z0-9_]*$") then error("fresh_db: not a plain lower-case name: " .. name, 2) end
	local conn = h.connect(pg.dsn)
	-- identifiers cannot be parameters; the name was checked above.
	-- FORCE cannot end an autovacuum worker that is in the database (it
	-- runs as no role we may signal, 42501): those end soon, so retry.
	local deadline = core.monotime() + 60
	while true do
		local ok, msg, code = conn:exec("DROP DATABASE IF EXISTS " .. name .. " WITH (FORCE)")
		if ok then break end
		if code ~= "42501" or core.monotime() > deadline then error(msg, 2) end
		core.sleep(0.2)
	end
	assert(conn:exec("CREATE DATABASE " .. name))
	conn:close()
	return (pg.dsn:gsub("dbname=%S+", "dbname=" .. name))
end

function h.projection_db(name, files)
	local dsn = h.fresh_db(name)
	local conn = h.connect(dsn)
	assert(require("projhost.schema").migrate(conn))
	local dir = h.tmpdir()
	for file, text in pairs(files or {}) do h.write_file(dir .. "/" .. file, text) end
	return dsn, conn, dir
end

function h.ok(args, dsn, opts)
	local argv = { unpack(args) }
	argv[#argv + 1] = "--db"
	argv[#argv + 1] = dsn
	local code, out, err = h.run(argv, opts)
	assert(code == 0, ("projhost %s: exit %s\n%s%s"):format(table.concat(args, " "), tostring(code), out, err))
	return out, err
end

function h.sh_quote(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

function h.read_all(cmd)
	local p = assert(io.popen(cmd))
	local out = p:read("*a")
	p:close()
	return out
end

-- Raw TCP clients through the FFI (one declaration for every spec: a
-- second ffi.cdef of the same struct fails whole).
local ffi = require "ffi"
ffi.cdef [[
	struct ph_spec_sockaddr_in { uint16_t family; uint16_t port; uint32_t addr; char zero[8]; };
	int socket(int, int, int);
	int connect(int, const void *, uint32_t);
	int setsockopt(int, int, int, const void *, uint32_t);
	long send(int, const void *, size_t, int);
	long recv(int, void *, size_t, int);
	int close(int);
	int poll(void *, unsigned long, int);
	uint16_t htons(uint16_t);
	uint32_t htonl(uint32_t);
	struct ph_spec_rlimit { uint64_t cur, max; };
	int getrlimit(int, struct ph_spec_rlimit *);
	int setrlimit(int, const struct ph_spec_rlimit *);
]]

-- Set this process's soft limit of open files (children inherit it) to n,
-- at most its hard limit; returns the one it had.
function h.open_files(n)
	local rl = ffi.new("struct ph_spec_rlimit")
	assert(ffi.C.getrlimit(7 --[[RLIMIT_NOFILE]], rl) == 0, "getrlimit")
	local had = tonumber(rl.cur)
	rl.cur = math.min(n, tonumber(rl.max))
	assert(ffi.C.setrlimit(7, rl) == 0, "setrlimit")
	return had
end

-- A connected socket to 127.0.0.1:port; rcvbuf: SO_RCVBUF (a slow reader).
function h.tcp_connect(port, rcvbuf)
	local fd = ffi.C.socket(2, 1, 0)
	assert(fd >= 0, "socket")
	if rcvbuf then
		local v = ffi.new("int[1]", rcvbuf)
		ffi.C.setsockopt(fd, 1 --[[SOL_SOCKET]], 8 --[[SO_RCVBUF]], v, 4)
	end
	local sa = ffi.new("struct ph_spec_sockaddr_in")
	sa.family = 2
	sa.port = ffi.C.htons(port)
	sa.addr = ffi.C.htonl(0x7f000001)
	assert(ffi.C.connect(fd, sa, ffi.sizeof(sa)) == 0, "connect")
	return fd
end

function h.tcp_send(fd, s)
	return tonumber(ffi.C.send(fd, s, #s, 0x4000 --[[MSG_NOSIGNAL]]))
end

-- Wait up to timeout seconds for fd to be readable; then what recv gives:
-- the bytes, "" at EOF (or reset by the peer), or nil (nothing yet).
function h.tcp_recv(fd, timeout)
	local pfd = ffi.new("struct { int fd; short events; short revents; }[1]")
	pfd[0].fd, pfd[0].events = fd, 1
	if ffi.C.poll(pfd, 1, math.floor(timeout * 1000)) <= 0 then return nil end
	local buf = ffi.new("char[65536]")
	local n = tonumber(ffi.C.recv(fd, buf, 65536, 0))
	if n < 0 then return "" end
	return ffi.string(buf, n)
end

function h.tcp_close(fd)
	ffi.C.close(fd)
end

return h
