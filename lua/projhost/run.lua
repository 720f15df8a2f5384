-- projhost run: hand the resolved configuration to the C master (core/master.c).
-- The master LISTENs, queues and feeds `projhost __worker` processes; all
-- projection code runs in those workers (lua/projhost/worker/).
local core = require "projhost.core"
local lfs = require "lfs"

local M = {}

-- Relative paths against the working directory as the kernel knows it
-- ($PWD can be stale or absent; no shell is asked).
local function absolute(path)
	if path:sub(1, 1) == "/" then return path end
	local cwd = assert(lfs.currentdir())
	return cwd .. "/" .. path:gsub("^%./", "")
end

-- One WARN line when the DSN's role is a superuser (README "Security
-- model"): projection SQL then runs with every privilege of the server.
-- A connection failure says nothing here; the master reports it.
function M.warn_if_superuser(dsn)
	local conn = core.connect(dsn)
	if not conn then return false end
	local rows = conn:query("SELECT current_user AS u, current_setting('is_superuser') AS su")
	conn:close()
	if not rows or rows[1].su ~= "on" then return false end
	core.log("warn", "host", ("connects as superuser %s: projection SQL can run programs and read files on "
		.. "the database server (COPY ... TO PROGRAM, pg_read_file) and change any database; use a role "
		.. "that is not a superuser"):format((rows[1].u:gsub("%c", "?"))))
	return true
end

-- opts: dsn, bin, paths, workers, once, http (host:port or nil)
function M.main(opts)
	local paths = {}
	for i, p in ipairs(opts.paths) do paths[i] = absolute(p) end
	M.warn_if_superuser(opts.dsn)
	return core.run_master {
		dsn = opts.dsn,
		bin = opts.bin,
		paths = paths,
		workers = opts.workers or 1,
		once = opts.once and true or false,
		http = opts.http,
		poll_interval = require("projhost.config").get("PROJHOST_POLL_INTERVAL"),
		stall_after = require("projhost.config").get("PROJHOST_STALL_AFTER"),
	}
end

return M
