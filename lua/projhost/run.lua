-- projhost run: hand the resolved configuration to the C master (core/master.c).
-- The master LISTENs, queues and feeds `projhost __worker` processes; all
-- projection code runs in those workers (lua/projhost/worker.lua).
local core = require "projhost.core"

local M = {}

local function absolute(path)
	if path:sub(1, 1) == "/" then return path end
	local pwd = os.getenv("PWD")
	if not pwd then
		local p = io.popen("pwd")
		pwd = p:read("*l")
		p:close()
	end
	return pwd .. "/" .. path:gsub("^%./", "")
end

-- opts: dsn, bin, paths, workers, once
function M.main(opts)
	local paths = {}
	for i, p in ipairs(opts.paths) do paths[i] = absolute(p) end
	return core.run_master {
		dsn = opts.dsn,
		bin = opts.bin,
		paths = paths,
		workers = opts.workers or 1,
		once = opts.once and true or false,
		poll_interval = tonumber(os.getenv("PROJHOST_POLL_INTERVAL")) or 5,
	}
end

return M
