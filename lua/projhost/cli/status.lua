-- projhost.cli.status: `projhost status [NAME] [--json]`.
local cjson = require "projhost.json"
local util = require "projhost.cli.util"
local fail, say, escape = util.fail, util.say, util.escape
local open_db, print_table, known = util.open_db, util.print_table, util.known

local commands = {}

local STATUS_SQL = [[
SELECT projection, count(*) AS partitions,
	count(*) FILTER (WHERE status = 'running') AS running,
	count(*) FILTER (WHERE status = 'paused') AS paused,
	count(*) FILTER (WHERE status = 'failed') AS failed,
	count(*) FILTER (WHERE status = 'stopped') AS stopped,
	count(*) FILTER (WHERE version = 0) AS resetting,
	max(last_pos) AS position,
	(array_agg(CASE WHEN partition = '' THEN error ELSE partition || ': ' || error END
		ORDER BY updated_at DESC) FILTER (WHERE error IS NOT NULL))[1] AS error,
	to_char(max(updated_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS updated_at
FROM projhost.checkpoints
WHERE $1::text IS NULL OR projection = $1
GROUP BY projection
ORDER BY projection]]

-- The oldest transaction anywhere in the cluster that holds the xmin
-- horizon back (design §2: it delays every projection).
local HORIZON_SQL = [[
SELECT pid, datname, state, left(query, 60) AS query,
	round(extract(epoch FROM clock_timestamp() - xact_start)::numeric, 1) AS age_s
FROM pg_stat_activity
WHERE (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
	AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
ORDER BY xact_start
LIMIT 1]]

local function status_of(r)
	for _, s in ipairs({ "failed", "stopped", "paused" }) do
		if r[s] > 0 then return s end
	end
	return "running"
end

function commands.status(cmd)
	local name = cmd.args[1]
	local conn, err = open_db(cmd)
	if not conn then return fail("status", err) end
	local rows, msg = conn:query(STATUS_SQL, name)
	if rows and name and #rows == 0 then
		local _, unknown = known(conn, name)
		conn:close()
		return fail("status", unknown)
	end
	local hz, top, parked
	if rows then hz, msg = conn:query(HORIZON_SQL) end
	if hz then
		top, msg = conn:query("SELECT coalesce((SELECT max(global_position) FROM projhost.events), 0) AS top, "
			.. "(SELECT count(*) FROM projhost.parked) AS parked")
	end
	conn:close()
	if not top then return fail("status", msg) end
	local max_pos = tonumber(top[1].top)
	parked = tonumber(top[1].parked)
	local projections = {}
	for _, r in ipairs(rows) do
		local p = {
			name = r.projection,
			partitions = tonumber(r.partitions),
			running = tonumber(r.running), paused = tonumber(r.paused),
			failed = tonumber(r.failed), stopped = tonumber(r.stopped),
			position = tonumber(r.position),
			error = r.error,
			updated_at = r.updated_at,
			reset_pending = tonumber(r.resetting) > 0,
		}
		p.status = status_of(p)
		p.behind = math.max(0, max_pos - p.position)
		projections[#projections + 1] = p
	end
	local horizon = hz[1] and {
		pid = tonumber(hz[1].pid), age_s = tonumber(hz[1].age_s), state = hz[1].state,
		query = hz[1].query, database = hz[1].datname,
	}
	if cmd.flags.json then
		-- cjson 2.1.0 encodes an empty table as {}, so the array is built by hand.
		local items = {}
		for i, p in ipairs(projections) do
			items[i] = cjson.encode{
				name = p.name, partitions = p.partitions, status = p.status, position = p.position,
				behind = p.behind, error = p.error or cjson.null, updated_at = p.updated_at,
				reset_pending = p.reset_pending,
				statuses = { running = p.running, paused = p.paused, failed = p.failed, stopped = p.stopped },
			}
		end
		say(('{"projections":[%s],"horizon":%s,"parked":%d,"events":%d}'):format(
			table.concat(items, ","), horizon and cjson.encode(horizon) or "null", parked, max_pos))
		return 0
	end
	if #projections == 0 then
		say("no projections have run yet")
	else
		local shown = {}
		for i, p in ipairs(projections) do
			local st = p.status
			if p.partitions > 1 and p[st] < p.partitions then st = ("%s %d/%d"):format(st, p[st], p.partitions) end
			if p.reset_pending then st = st .. " (reset pending)" end
			shown[i] = { name = p.name, partitions = p.partitions, status = st, position = p.position,
				behind = p.behind, updated = p.updated_at, error = p.error or "" }
		end
		print_table(shown, { { "name", "PROJECTION" }, { "partitions", "PARTITIONS" }, { "status", "STATUS" },
			{ "position", "POSITION" }, { "behind", "BEHIND(~)" }, { "updated", "UPDATED" }, { "error", "ERROR", 80 } })
	end
	say(("events: %d   parked: %d"):format(max_pos, parked))
	if horizon then
		-- another session's query text: anything can be in it
		say(("horizon: pid %d (%s) has had a transaction open for %.1fs, %s: %s"):format(horizon.pid,
			escape(horizon.database or "?"), horizon.age_s or 0, escape(horizon.state or "?"),
			escape((horizon.query or ""):gsub("%s+", " "))))
	else
		say("horizon: no open transaction holds it back")
	end
	return 0
end

return commands
