-- projhost.cli.status: `projhost status [NAME] [--json] [--failed] [--behind] [--limit N]`.
--
-- Every figure comes from the database (schema step 5): projhost.status_json
-- is the document (`--json` prints it as the server wrote it; the master's
-- GET /status serves the same), and the table for people is made from it;
-- `status NAME` adds the projection's partitions from projhost.partition_status.
local cjson = require "projhost.json"
local config = require "projhost.config"
local util = require "projhost.cli.util"
local fail, say, escape = util.fail, util.say, util.escape
local open_db, print_table, known = util.open_db, util.print_table, util.known

local commands = {}

-- partitions listed by `status NAME` unless --limit says otherwise
local DEFAULT_LIMIT = 20

local function num(v)
	if v == nil or v == cjson.null then return nil end
	return tonumber(v)
end

-- "2m10s" (util.duration), "?" for not known
local function duration(s)
	return util.duration(num(s))
end

local function lag_text(s)
	s = num(s)
	if not s then return "?" end
	if s < 10 then return string.format("%.1fs", s) end
	return duration(s)
end

-- The status cell: "failed 1/3", "running", "rebuilding 45% ETA 2m10s",
-- "(reset pending)" when `projhost reset` asked for one.
local function status_text(p)
	local st = p.status
	local count = p.statuses and p.statuses[st]
	if p.partitions > 1 and count and count < p.partitions then st = ("%s %d/%d"):format(st, count, p.partitions) end
	if st == "rebuilding" then
		local pct, eta = num(p.progress), num(p.eta_seconds)
		st = ("rebuilding %s ETA %s"):format(pct and (math.floor(pct) .. "%") or "?", eta and duration(eta) or "?")
	end
	if p.reset_pending then st = st .. " (reset pending)" end
	return st
end

local PARTITIONS_SQL = [[
SELECT partition, version,
	to_char(processed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS processed_at,
	status, error, behind
FROM projhost.partition_status
WHERE projection = $1 AND (NOT $2 OR status = 'failed')
ORDER BY partition
LIMIT $3]]

-- --behind: projhost.partitions_behind (schema: "The partitions behind"),
-- which takes the limit itself (none under --failed: it filters after)
local BEHIND_SQL = [[
SELECT partition, version,
	to_char(processed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS processed_at,
	status, error, behind
FROM projhost.partitions_behind($1, CASE WHEN $2 THEN NULL ELSE $3::bigint END)
WHERE NOT $2 OR status = 'failed'
ORDER BY partition
LIMIT $3::bigint]]

local function print_partitions(conn, name, cmd)
	local limit = cmd.flags.limit or DEFAULT_LIMIT
	local rows, msg = conn:query(cmd.flags.behind and BEHIND_SQL or PARTITIONS_SQL, name,
		cmd.flags.failed and true or false, limit + 1)
	if not rows then return nil, msg end
	local more = #rows > limit
	if more then rows[#rows] = nil end
	say("")
	if #rows == 0 then
		say(cmd.flags.failed and "no partition has failed" or cmd.flags.behind and "no partition is behind"
			or "no partitions yet")
		return true
	end
	local shown = {}
	for i, r in ipairs(rows) do
		-- no status: a stream without a checkpoint row yet
		shown[i] = { partition = r.partition == "" and "(all)" or r.partition, version = r.version,
			processed = r.processed_at or "", status = r.status or "new", behind = r.behind, error = r.error or "" }
	end
	print_table(shown, { { "partition", "PARTITION", 60 }, { "version", "VERSION" }, { "processed", "PROCESSED" },
		{ "status", "STATUS" }, { "behind", "BEHIND" }, { "error", "ERROR", 80 } })
	if more then say(("(first %d shown; --limit N shows more)"):format(limit)) end
	return true
end

function commands.status(cmd)
	local name = cmd.args[1]
	local conn, err = open_db(cmd)
	if not conn then return fail("status", err) end
	-- short queries over big tables: compiling them (the view's function
	-- calls price them high) took longer than running them
	conn:exec("SET jit = off")
	if name and cmd.flags.behind then
		-- partitions_behind takes the events behind that status_json counted
		-- (lag_rows notes them) when both see one snapshot: 0.3 s less at
		-- 1,000,000 partitions
		conn:exec("BEGIN ISOLATION LEVEL REPEATABLE READ")
	end
	local rows, msg = conn:query("SELECT projhost.status_json($1, $2)::text AS doc", name,
		config.get("PROJHOST_STALL_AFTER"))
	if not rows then
		conn:close()
		return fail("status", msg)
	end
	local text = rows[1].doc
	local doc = cjson.decode(text)
	if name and #doc.projections == 0 then
		local _, unknown = known(conn, name)
		conn:close()
		return fail("status", unknown)
	end
	if cmd.flags.json then
		conn:close()
		say(text)
		return 0
	end
	local projections = doc.projections
	if #projections == 0 then
		say("no projections have run yet")
	else
		local shown = {}
		for i, p in ipairs(projections) do
			local behind = num(p.events_behind) or 0
			-- estimated: the count of an unpartitioned projection (past its
			-- cap), the lag of a partitioned one (a lower bound)
			local est_count, est_lag = p.behind_estimated and not p.partitioned, p.behind_estimated and p.partitioned
			shown[i] = { name = p.name, partitions = p.partitions, status = status_text(p), position = p.position,
				behind = (est_count and "~" or "") .. tostring(behind),
				lag = behind == 0 and "0s" or ((est_lag and ">" or "") .. lag_text(p.lag_seconds)),
				rate = ("%.0f/s"):format(num(p.rate_1m) or 0),
				eta = behind == 0 and "-" or duration(num(p.eta_seconds)),
				parked = p.parked, updated = p.updated_at, error = p.error ~= cjson.null and p.error or "" }
		end
		print_table(shown, { { "name", "PROJECTION" }, { "partitions", "PARTITIONS" }, { "status", "STATUS" },
			{ "position", "POSITION" }, { "behind", "BEHIND" }, { "lag", "LAG" }, { "rate", "RATE" },
			{ "eta", "ETA" }, { "parked", "PARKED" }, { "updated", "UPDATED" }, { "error", "ERROR", 80 } })
		for _, p in ipairs(projections) do
			if p.status == "rebuilding" then say(escape(p.name) .. " " .. status_text(p)) end
			if p.stalled then
				say(("%s stalled: %s events behind and nothing applied for over %gs (PROJHOST_STALL_AFTER)")
					:format(escape(p.name), tostring(p.events_behind), doc.stall_after))
			end
		end
	end
	say(("events: %d   parked: %d"):format(doc.events, doc.parked))
	local horizon = doc.horizon ~= cjson.null and doc.horizon
	if horizon then
		-- another session's query text: anything can be in it
		say(("horizon: pid %d (%s) has had a transaction open for %.1fs, %s: %s"):format(horizon.pid,
			escape(horizon.database ~= cjson.null and horizon.database or "?"), num(horizon.age_s) or 0,
			escape(horizon.state ~= cjson.null and horizon.state or "?"),
			escape((horizon.query ~= cjson.null and horizon.query or ""):gsub("%s+", " "))))
	else
		say("horizon: no open transaction holds it back")
	end
	if name then
		local ok, perr = print_partitions(conn, name, cmd)
		if not ok then
			conn:close()
			return fail("status", perr)
		end
	end
	conn:close()
	return 0
end

return commands
