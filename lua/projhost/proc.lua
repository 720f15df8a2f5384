-- projhost.proc: start and reap child processes from LuaJIT (posix_spawn and
-- wait4 through the FFI), or become one (execv). Used by the spec helpers,
-- `make bench` and `projhost db psql`.
--
-- Not a shell: we are the children's parent, so wait gives real exit codes
-- and peak RSS, and no child inherits the SIGINT-ignored disposition a
-- shell gives `cmd &` (specs send SIGINT to `projhost run`).
--
--   proc.environ() -> { { name, value }, ... } in environment order
--   proc.spawn(path, args, env, files) -> pid   (raises if it cannot start)
--       env: array of "NAME=value"; files: stdin, stdout, stderr (paths;
--       stderr == stdout shares one file description, like 2>&1), cwd
--   proc.wait(pid, timeout_s) -> code, maxrss_kb | nil on timeout
--       code is 128 + signal when a signal ended it; timeout 0 only polls
--   proc.exec(path, args) -> nil, msg   replace this process (execv; argv[0]
--       is args[1]); returns only when that failed
--   proc.tmpdir(prefix) -> path | nil, msg   a new directory "<prefix>XXXXXX",
--       mode 0755 so `nobody` (who runs test clusters when we are root) can
--       reach it
local ffi = require "ffi"
local bit = require "bit"
local core = require "projhost.core"

local M = {}

-- busted reloads modules per spec file; declarations must happen once
if not pcall(ffi.typeof, "ph_proc_rusage_t") then
	ffi.cdef [[
	typedef struct { long _opaque[64]; } ph_proc_actions_t;
	typedef struct { long _opaque[128]; } ph_proc_attr_t;
	typedef struct { unsigned long val[16]; } ph_proc_sigset_t;
	typedef struct { long tv_sec; long tv_usec; } ph_proc_timeval_t;
	typedef struct {
		ph_proc_timeval_t ru_utime, ru_stime;
		long ru_maxrss, ru_ixrss, ru_idrss, ru_isrss, ru_minflt, ru_majflt, ru_nswap,
			ru_inblock, ru_oublock, ru_msgsnd, ru_msgrcv, ru_nsignals, ru_nvcsw, ru_nivcsw;
	} ph_proc_rusage_t;
	int posix_spawn_file_actions_init(ph_proc_actions_t *fa);
	int posix_spawn_file_actions_destroy(ph_proc_actions_t *fa);
	int posix_spawn_file_actions_addopen(ph_proc_actions_t *fa, int fd, const char *path, int oflag, unsigned int mode);
	int posix_spawn_file_actions_adddup2(ph_proc_actions_t *fa, int fd, int newfd);
	int posix_spawn_file_actions_addchdir_np(ph_proc_actions_t *fa, const char *path);
	int posix_spawnattr_init(ph_proc_attr_t *a);
	int posix_spawnattr_destroy(ph_proc_attr_t *a);
	int posix_spawnattr_setflags(ph_proc_attr_t *a, short flags);
	int posix_spawnattr_setsigdefault(ph_proc_attr_t *a, const ph_proc_sigset_t *s);
	int posix_spawnattr_setsigmask(ph_proc_attr_t *a, const ph_proc_sigset_t *s);
	int sigemptyset(ph_proc_sigset_t *s);
	int sigfillset(ph_proc_sigset_t *s);
	int posix_spawn(int *pid, const char *path, const ph_proc_actions_t *fa, const ph_proc_attr_t *a,
		char *const argv[], char *const envp[]);
	int wait4(int pid, int *status, int options, ph_proc_rusage_t *ru);
	char *mkdtemp(char *template);
	int chmod(const char *path, unsigned int mode);
	char *strerror(int errnum);
	int execv(const char *path, char *const argv[]);
	extern char **environ;
	]]
end

local C = ffi.C
local O_RDONLY, O_WRONLY, O_CREAT, O_TRUNC = 0, 1, 64, 512
local POSIX_SPAWN_SETSIGDEF, POSIX_SPAWN_SETSIGMASK = 4, 8
local WNOHANG = 1

function M.environ()
	local out, i = {}, 0
	while C.environ[i] ~= nil do
		local kv = ffi.string(C.environ[i])
		local k = kv:match("^([^=]*)=")
		if k then out[#out + 1] = { k, kv:sub(#k + 2) } end
		i = i + 1
	end
	return out
end

local function cstrings(list)
	local arr = ffi.new("char *[?]", #list + 1)
	local keep = {}
	for i, s in ipairs(list) do
		keep[i] = ffi.new("char[?]", #s + 1, s)
		arr[i - 1] = keep[i]
	end
	arr[#list] = nil
	return arr, keep
end

function M.spawn(path, args, env, files)
	local argv_list = { path }
	for _, a in ipairs(args) do argv_list[#argv_list + 1] = tostring(a) end
	local argv, keep_a = cstrings(argv_list)
	local envp, keep_e = cstrings(env)
	local fa, attr = ffi.new("ph_proc_actions_t"), ffi.new("ph_proc_attr_t")
	local mode = tonumber("644", 8)
	C.posix_spawn_file_actions_init(fa)
	C.posix_spawn_file_actions_addopen(fa, 0, files.stdin or "/dev/null", O_RDONLY, 0)
	C.posix_spawn_file_actions_addopen(fa, 1, files.stdout or "/dev/null", O_WRONLY + O_CREAT + O_TRUNC, mode)
	if files.stderr == files.stdout then
		C.posix_spawn_file_actions_adddup2(fa, 1, 2)
	else
		C.posix_spawn_file_actions_addopen(fa, 2, files.stderr or "/dev/null", O_WRONLY + O_CREAT + O_TRUNC, mode)
	end
	if files.cwd then C.posix_spawn_file_actions_addchdir_np(fa, files.cwd) end
	C.posix_spawnattr_init(attr)
	local all, none = ffi.new("ph_proc_sigset_t"), ffi.new("ph_proc_sigset_t")
	C.sigfillset(all)
	C.sigemptyset(none)
	C.posix_spawnattr_setsigdefault(attr, all)
	C.posix_spawnattr_setsigmask(attr, none)
	C.posix_spawnattr_setflags(attr, POSIX_SPAWN_SETSIGDEF + POSIX_SPAWN_SETSIGMASK)
	local pid = ffi.new("int[1]")
	local rc = C.posix_spawn(pid, path, fa, attr, argv, envp)
	C.posix_spawn_file_actions_destroy(fa)
	C.posix_spawnattr_destroy(attr)
	local _ = { keep_a, keep_e }
	if rc ~= 0 then error("cannot start " .. path .. ": " .. ffi.string(C.strerror(rc)), 2) end
	return pid[0]
end

function M.wait(pid, timeout)
	local deadline = core.monotime() + (timeout or 0)
	local st, ru = ffi.new("int[1]"), ffi.new("ph_proc_rusage_t")
	local nap = 0.0005
	while true do
		local r = C.wait4(pid, st, WNOHANG, ru)
		if r == pid then
			local s = st[0]
			local code = bit.band(s, 0x7f) == 0 and bit.band(bit.rshift(s, 8), 0xff) or 128 + bit.band(s, 0x7f)
			return code, tonumber(ru.ru_maxrss)
		elseif r < 0 then
			return -1, 0
		end
		if core.monotime() >= deadline then return nil end
		core.sleep(nap)
		nap = math.min(nap * 2, 0.01)
	end
end

function M.exec(path, args)
	local argv, keep = cstrings(args)
	io.stdout:flush()
	io.stderr:flush()
	C.execv(path, argv)
	local err = ffi.string(C.strerror(ffi.errno()))
	local _ = keep -- the strings argv points to live until here
	return nil, err
end

function M.tmpdir(prefix)
	local template = prefix .. "XXXXXX"
	local buf = ffi.new("char[?]", #template + 1, template)
	if C.mkdtemp(buf) == nil then
		return nil, "mkdtemp " .. template .. ": " .. ffi.string(C.strerror(ffi.errno()))
	end
	local dir = ffi.string(buf)
	C.chmod(dir, tonumber("755", 8))
	return dir
end

return M
