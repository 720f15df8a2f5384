-- projhost.cli.db: `projhost db start|stop|url|psql`, the embedded cluster.
local util = require "projhost.cli.util"
local fail, say, escape = util.fail, util.say, util.escape

local commands = {}

local function exec_psql(dsn, extra)
	local embedded = require "projhost.embedded"
	local path = embedded.psql_path()
	local args = { "psql", dsn }
	for _, a in ipairs(extra) do args[#args + 1] = a end
	local _, err = require("projhost.proc").exec(path, args)
	return fail("db psql", "cannot run " .. path .. ": " .. err)
end

function commands.db(cmd)
	local embedded = require "projhost.embedded"
	local sub = cmd.args[1]
	local what = "db " .. sub
	if sub == "url" then
		say(embedded.dsn())
		return 0
	elseif sub == "start" then
		local dsn, started = embedded.start()
		if not dsn then return fail(what, started) end
		say(started and ("started the embedded PostgreSQL in %s"):format(escape(embedded.home()))
			or ("the embedded PostgreSQL in %s is already running"):format(escape(embedded.home())))
		return 0
	elseif sub == "stop" then
		local ok, was = embedded.stop()
		if not ok then return fail(what, was) end
		say(was and ("stopped the embedded PostgreSQL in %s"):format(escape(embedded.home()))
			or ("the embedded PostgreSQL in %s is not running"):format(escape(embedded.home())))
		return 0
	else -- psql
		local dsn, err = embedded.start()
		if not dsn then return fail(what, err) end
		return exec_psql(dsn, cmd.rest)
	end
end

return commands
