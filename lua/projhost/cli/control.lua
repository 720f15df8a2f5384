-- projhost.cli.control: what operators change - `reset`, `pause`,
-- `resume` and `parked list|retry|skip` - each with a wake-up for the
-- running hosts.
local util = require "projhost.cli.util"
local fail, say, escape = util.fail, util.say, util.escape
local open_db, print_table, known = util.open_db, util.print_table, util.known

local commands = {}

-- The held events of $1 (NULL: every projection) leave the dead letters;
-- the statement goes on with their partitions as `d`.
local RELEASE_HELD = [[WITH d AS (DELETE FROM projhost.parked
	WHERE hold AND ($1::text IS NULL OR projection = $1) RETURNING projection, partition)
]]

-- Run sql (params: name) and NOTIFY in one transaction, after checking
-- that the projection exists. -> affected rows | nil, msg
local function change_projection(conn, name, sql, ...)
	local ok, msg = known(conn, name)
	if not ok then return nil, msg end
	ok, msg = conn:exec("BEGIN")
	if not ok then return nil, msg end
	local rows
	rows, msg = conn:query(sql, name, ...)
	-- '0 *': position 0, any stream; running hosts re-read their checkpoints.
	if rows then ok, msg = conn:exec("SELECT pg_notify('projhost', '0 *')") end
	if not rows or not ok then
		conn:exec("ROLLBACK")
		return nil, msg
	end
	ok, msg = conn:exec("COMMIT")
	if not ok then return nil, msg end
	return rows
end

function commands.reset(cmd)
	local name = cmd.args[1]
	local conn, err = open_db(cmd)
	if not conn then return fail("reset", err) end
	-- version 0 never matches a definition: the worker runs the reset SQL
	-- and rebuilds from the start at its next batch.
	local rows, msg = change_projection(conn, name, [[
		UPDATE projhost.checkpoints SET version = 0, status = 'running', error = NULL, updated_at = now()
		WHERE projection = $1 RETURNING partition]])
	conn:close()
	if not rows then return fail("reset", msg) end
	say(("reset %s (%d partition%s): running hosts run its reset SQL and rebuild it from the start at their next batch")
		:format(escape(name), #rows, #rows == 1 and "" or "s"))
	return 0
end

function commands.pause(cmd)
	local name = cmd.args[1]
	local conn, err = open_db(cmd)
	if not conn then return fail("pause", err) end
	-- Failed and stopped partitions are not running either; they keep
	-- their status and error so `status` still shows why.
	local rows, msg = change_projection(conn, name, [[
		UPDATE projhost.checkpoints SET status = 'paused', updated_at = now()
		WHERE projection = $1 AND status = 'running' RETURNING partition]])
	conn:close()
	if not rows then return fail("pause", msg) end
	if #rows == 0 then
		say(("%s: nothing to pause (no running partitions)"):format(escape(name)))
	else
		say(("paused %s (%d partition%s)"):format(escape(name), #rows, #rows == 1 and "" or "s"))
	end
	return 0
end

-- resume NAME [--partition P]: paused, failed, stopped and done (ctx:done)
-- partitions run again - all of them, or partition P only. A held one
-- (on_error "hold") is not: its held event is in the dead letters, and
-- `parked retry|skip` decides what happens to it.
function commands.resume(cmd)
	local name = cmd.args[1]
	local part = cmd.flags.partition
	local conn, err = open_db(cmd)
	if not conn then return fail("resume", err) end
	local rows, msg = change_projection(conn, name, [[
		WITH old AS (
			SELECT partition, status FROM projhost.checkpoints
			WHERE projection = $1 AND status <> 'running' AND status <> 'held'
				AND ($2::text IS NULL OR partition = $2) FOR UPDATE
		)
		UPDATE projhost.checkpoints c SET status = 'running', error = NULL, updated_at = now()
		FROM old WHERE c.projection = $1 AND c.partition = old.partition
		RETURNING old.status]], part)
	if rows and #rows == 0 and part then
		local st = conn:query([[SELECT status FROM projhost.checkpoints
			WHERE projection = $1 AND partition = $2]], name, part)
		conn:close()
		if st and not st[1] then
			return fail("resume", ("%s has no partition %s"):format(escape(name), escape(part)))
		end
		if st and st[1].status == "held" then
			say(("%s: partition %s is held behind a parked event: `projhost parked retry|skip %s` releases it")
				:format(escape(name), escape(part), escape(name)))
			return 0
		end
		say(("%s: partition %s is already running"):format(escape(name), escape(part)))
		return 0
	end
	conn:close()
	if not rows then return fail("resume", msg) end
	if #rows == 0 then
		say(("%s: already running"):format(escape(name)))
		return 0
	end
	local counts, parts = {}, {}
	for _, r in ipairs(rows) do counts[r.status] = (counts[r.status] or 0) + 1 end
	if part then parts[1] = "partition " .. escape(part) end
	for _, s in ipairs({ "paused", "failed", "stopped", "done" }) do
		if counts[s] then parts[#parts + 1] = counts[s] .. " " .. s end
	end
	say(("resumed %s (%s)"):format(escape(name), table.concat(parts, ", ")))
	return 0
end

function commands.parked(cmd)
	local sub, name = cmd.args[1], cmd.args[2]
	local what = "parked " .. sub
	local conn, err = open_db(cmd)
	if not conn then return fail(what, err) end
	if name then
		local ok, unknown = known(conn, name)
		if not ok then
			conn:close()
			return fail(what, unknown)
		end
	end
	if sub == "retry" then
		-- Running hosts pick flagged events up at the partition's next batch
		-- (woken by the NOTIFY) and run them before newer ones; an event
		-- that fails again is parked again.
		-- A held event (on_error "hold") is not flagged: its partition
		-- runs again from its checkpoint, which is just before it, so the
		-- next batch applies it and then the events behind it, in order,
		-- like any batch (one that fails again gets on_error again, from
		-- attempt 1, and may be held again).
		local ok, msg = conn:exec("BEGIN")
		local rows, held
		if ok then
			rows, msg = conn:query([[UPDATE projhost.parked SET retry_requested = true
				WHERE ($1::text IS NULL OR projection = $1) AND NOT retry_requested AND NOT hold
				RETURNING projection, partition]], name)
			ok = rows
		end
		if ok then
			held, msg = conn:query(RELEASE_HELD .. [[
				UPDATE projhost.checkpoints c SET status = 'running', attempts = 0, error = NULL, updated_at = now()
				FROM d WHERE c.projection = d.projection AND c.partition = d.partition AND c.status = 'held'
				RETURNING c.partition]], name)
			ok = held
		end
		if ok then ok, msg = conn:exec("SELECT pg_notify('projhost', '0 *')") end
		if ok then ok, msg = conn:exec("COMMIT") end
		conn:close()
		if not ok then return fail(what, msg) end
		if #held > 0 then
			say(("released %d held partition%s%s: running hosts apply the held event and then the rest in order")
				:format(#held, #held == 1 and "" or "s", name and " of " .. escape(name) or ""))
			if #rows == 0 then return 0 end
		end
		local n = #rows
		say(("retrying %d parked event%s%s: running hosts apply %s at the next batch "
			.. "(an event that fails again is parked again)"):format(n, n == 1 and "" or "s",
			name and " of " .. escape(name) or "", n == 1 and "it" or "them"))
		return 0
	end
	if sub == "skip" then
		-- recorded as skipped, so projhost.applied()/wait_for say so; a
		-- held partition moves past its held event and runs again (the
		-- events behind it follow, in order)
		local ok, msg = conn:exec("BEGIN")
		local n
		if ok then
			n, msg = conn:exec([[WITH d AS (DELETE FROM projhost.parked
					WHERE $1::text IS NULL OR projection = $1
					RETURNING projection, partition, global_position, stream_id, stream_version, error, hold),
				r AS (UPDATE projhost.checkpoints c SET status = 'running',
						last_pos = greatest(c.last_pos, d.stream_version), attempts = 0, error = NULL,
						updated_at = now()
					FROM d WHERE d.hold AND c.projection = d.projection AND c.partition = d.partition
						AND c.status = 'held')
				INSERT INTO projhost.skipped (projection, partition, global_position, stream_id, stream_version, error)
				SELECT projection, partition, global_position, stream_id, stream_version,
					'projhost parked skip: ' || coalesce(error, '')
				FROM d ON CONFLICT (projection, global_position) DO NOTHING]], name)
			ok = n
		end
		if ok then ok, msg = conn:exec("SELECT pg_notify('projhost', '0 *')") end
		if ok then ok, msg = conn:exec("COMMIT") end
		if not ok then conn:exec("ROLLBACK") end
		conn:close()
		if not ok then return fail(what, msg) end
		say(("skipped %d parked event%s%s"):format(n, n == 1 and "" or "s", name and " of " .. escape(name) or ""))
		return 0
	end
	local rows, msg = conn:query([[
		SELECT id, projection, partition, global_position, stream_id, stream_version, event_type, attempts,
			CASE WHEN hold THEN 'held' ELSE 'parked' END AS kind,
			to_char(parked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS parked_at, error
		FROM projhost.parked WHERE $1::text IS NULL OR projection = $1 ORDER BY id]], name)
	conn:close()
	if not rows then return fail(what, msg) end
	if #rows == 0 then
		say(name and ("no parked events for " .. escape(name)) or "no parked events")
		return 0
	end
	for _, r in ipairs(rows) do
		r.event = ("%s@%s %s"):format(r.stream_id or "?", r.stream_version or "?", r.event_type or "?")
		if r.partition == "" then r.partition = "-" end
	end
	print_table(rows, { { "id", "ID" }, { "projection", "PROJECTION" }, { "partition", "PARTITION" },
		{ "global_position", "POSITION" }, { "event", "EVENT" }, { "kind", "KIND" }, { "attempts", "ATTEMPTS" },
		{ "parked_at", "PARKED" }, { "error", "ERROR", 100 } })
	return 0
end

return commands
