-- projhost.cli.wait: `projhost wait NAME [--stream S --version V] [--timeout SEC]`.
--
-- Read-your-writes from the shell: waits until projection NAME has handled
-- event S@V (projhost.wait_for: applied, parked or skipped - the answer
-- says which), or, without --stream, everything committed before the call
-- (projhost.wait_all). Exit 0 when it has, 1 at the timeout (or on an
-- error: an unknown projection or event).
local util = require "projhost.cli.util"
local fail, say, escape = util.fail, util.say, util.escape

local commands = {}

-- seconds waited when --timeout is not given
commands.DEFAULT_TIMEOUT = 60
-- one call waits at most this long, so an interrupted CLI leaves no
-- backend waiting for long
local SLICE_MS = 1000

function commands.wait(cmd)
	local name, stream, version = cmd.args[1], cmd.flags.stream, cmd.flags.version
	local timeout = cmd.flags.timeout or commands.DEFAULT_TIMEOUT
	local conn, err = util.open_db(cmd)
	if not conn then return fail("wait", err) end
	local core = require "projhost.core"
	local deadline = core.monotime() + timeout
	local done, rows, msg
	repeat
		local left = math.max(0, math.min(SLICE_MS, math.floor((deadline - core.monotime()) * 1000)))
		if stream then
			rows, msg = conn:query("SELECT projhost.wait_for($1, $2, $3, $4) AS ok", name, stream, version, left)
		else
			rows, msg = conn:query("SELECT projhost.wait_all($1, $2) AS ok", name, left)
		end
		if not rows then
			conn:close()
			return fail("wait", msg)
		end
		done = rows[1].ok == "t"
	until done or core.monotime() >= deadline
	local answer, how = "applied", nil
	if done and stream then
		-- and who skipped it: its on_error, or an operator (cli/control.lua)
		rows, msg = conn:query([[SELECT projhost.applied($1, $2, $3) AS a,
			(SELECT CASE WHEN s.error LIKE 'projhost parked skip:%' THEN 'operator' END FROM projhost.skipped s
			WHERE s.projection = $1 AND s.stream_id = $2 AND s.stream_version = $3 LIMIT 1) AS how]],
			name, stream, version)
		if not rows then
			conn:close()
			return fail("wait", msg)
		end
		answer, how = rows[1].a, rows[1].how
	end
	conn:close()
	local what = stream and ("%s@%d"):format(escape(stream), version) or "everything committed before the call"
	if not done then
		return fail("wait", ("timed out after %gs: %s has not applied %s yet"):format(timeout, name, what))
	end
	if answer == "parked" then
		say(("%s parked %s (its handler failed: projhost parked list %s)"):format(escape(name), what, escape(name)))
	elseif answer == "ignored" then
		say(("%s ignored %s (its partition is done: ctx:done)"):format(escape(name), what))
	elseif answer == "skipped" then
		say(("%s skipped %s (%s)"):format(escape(name), what,
			how == "operator" and "projhost parked skip" or "its on_error said skip"))
	else
		say(("%s applied %s"):format(escape(name), what))
	end
	return 0
end

return commands
