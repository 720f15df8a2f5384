-- projhost.proc: child processes for the CLI, the spec helpers and `make
-- bench`, over projhost.core's process API (core/proc.c: posix_spawn and
-- wait4, no shell). Kept as a module for its callers' conveniences:
--
--   proc.environ() -> { { name, value }, ... } in environment order
--   proc.spawn(path, args, env, files) -> pid   (raises if it cannot start)
--       args: any values (tostring'd); env: array of "NAME=value"; files:
--       stdin, stdout, stderr (paths; stderr == stdout shares one file
--       description, like 2>&1), cwd
--   proc.wait(pid, timeout_s) -> code, maxrss_kb | nil on timeout
--       code is 128 + signal when a signal ended it; timeout 0 only polls
--   proc.exec(path, args) -> nil, msg   replace this process (argv[0] is
--       args[1]); returns only when that failed
--   proc.tmpdir(prefix) -> path | nil, msg   a new directory "<prefix>XXXXXX",
--       mode 0755 so `nobody` (who runs test clusters when we are root) can
--       reach it
local core = require "projhost.core"

local M = {}

M.environ = core.environ
M.tmpdir = core.tmpdir

function M.spawn(path, args, env, files)
	local argv = {}
	for i, a in ipairs(args) do argv[i] = tostring(a) end
	local pid, err = core.spawn(path, argv, env, { ["in"] = files.stdin, out = files.stdout,
		err = files.stderr, cwd = files.cwd })
	if not pid then error("cannot start " .. path .. ": " .. err, 2) end
	return pid
end

function M.wait(pid, timeout)
	local code, rss = core.wait(pid, timeout or 0)
	if code == nil and rss then return -1, 0 end -- not our child (or reaped)
	return code, rss
end

function M.exec(path, args)
	local argv = {}
	for i, a in ipairs(args) do argv[i] = tostring(a) end
	local _, err = core.exec(path, argv)
	return nil, err
end

return M
