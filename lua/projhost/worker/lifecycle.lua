-- A projection's lifecycle: (re)load of the files served, setup and its
-- own checkpoint row, reset on a new version, the shadow rebuild (adopt,
-- promote), the check every job starts with (prepare), and the progress
-- and caught-up lines with the caught_up hook.
local core = require "projhost.core"
local loader = require "projhost.loader"
local guard = require "projhost.guard"
local wire = require "projhost.wire"
local S = require "projhost.worker.state"
local session = require "projhost.worker.session"
local events = require "projhost.worker.events"
local ctxm = require "projhost.worker.ctx"
local failure = require "projhost.worker.failure"
local transact = require "projhost.worker.transact"
local parked = require "projhost.worker.parked"
local config = require "projhost.config"
local reads = require "projhost.reads"
local timers = require "projhost.worker.timers"

local log, first_line = session.log, session.first_line
local q, x, rollback = session.q, session.x, session.rollback
local ensure_conn, backoff, dberror = session.ensure_conn, session.backoff, session.dberror
local SESSION_SQL, SESSION_PARAMS = session.SESSION_SQL, session.SESSION_PARAMS
local ctx_for = ctxm.ctx_for
local overrun_at, overrun_clear, HOOKS = failure.overrun_at, failure.overrun_clear, failure.HOOKS
local retry_parked = parked.retry_parked
local ASYNC_CATCHUP = transact.ASYNC_CATCHUP
local of = S.of
local caught, progress = S.caught, S.progress

local M = {}
local check_stalls

-- a projection with events behind and no progress this long is stalled
local STALL_AFTER = config.get("PROJHOST_STALL_AFTER")
-- applied counts go to projhost.samples at most this often (status rates)
local SAMPLE_EVERY = 2
-- a catch-up longer than this logs a progress line every PROGRESS_EVERY s
local PROGRESS_EVERY = 5

-- Every partition of the projection under checkpoint name cp is no longer
-- caught up (it starts over, or under another name).
local function forget_caught(cp)
	for k in pairs(caught) do
		if k:sub(1, #cp + 1) == cp .. "\t" then caught[k] = nil end
	end
end

-- What the database knows of a projection's source (projhost.sources:
-- lag and wait_for count its events from it), written when it is set up.
local SOURCE_SQL = [[INSERT INTO projhost.sources (projection, name, kind, value, types, partitioned,
		own_events, version, shadow_of)
	VALUES ($1, $2, $3, $4, $5::text[], $6, $7, $8, $9)
	ON CONFLICT (projection) DO UPDATE SET name = EXCLUDED.name, kind = EXCLUDED.kind, value = EXCLUDED.value,
		types = EXCLUDED.types, partitioned = EXCLUDED.partitioned, own_events = EXCLUDED.own_events,
		version = EXCLUDED.version, shadow_of = EXCLUDED.shadow_of, updated_at = now(),
		applied = CASE WHEN sources.version = EXCLUDED.version THEN sources.applied ELSE 0 END
	-- a worker still serving an older version (before a reload reached
	-- it) never writes its source over the newer one's
	WHERE EXCLUDED.version >= sources.version AND (sources.name, sources.kind, sources.value, sources.types,
		sources.partitioned, sources.own_events, sources.version, sources.shadow_of)
		IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.kind, EXCLUDED.value,
		EXCLUDED.types, EXCLUDED.partitioned, EXCLUDED.own_events, EXCLUDED.version, EXCLUDED.shadow_of)]]

local function source_params(def)
	local rt, from = of(def), def.from
	local kind = from.all and "all" or from.stream and "stream" or "category"
	return rt.cp, def.name, kind, from.stream or from.category or "",
		def.type_filter and reads.pg_text_array(def.type_filter) or nil, def.partition and true or false,
		def.own_events and true or false, def.version, rt.shadow_of
end

-- setup SQL and the projection's own checkpoint row, once per connection.
-- Each setup string runs with the simple query protocol, so it may hold
-- several statements.
local function ensure_setup(def)
	local rt = of(def)
	if S.setup_done[rt.cp] then return true end
	local ok, err, code = x([[INSERT INTO projhost.checkpoints (projection, partition, version)
		VALUES ($1, '', $2) ON CONFLICT DO NOTHING]], rt.cp, def.version)
	if ok then ok, err, code = x(SOURCE_SQL, source_params(def)) end
	-- every = SECONDS: its tick's timer row
	if ok then ok, err, code = timers.arm(def, x) end
	if not ok then return nil, err, code end
	if #def.setup > 0 then
		x("BEGIN")
		-- two workers creating the same table at once would collide
		x("SELECT pg_advisory_xact_lock(hashtext('projhost.setup'))")
		for i, sql in ipairs(def.setup) do
			ok, err, code = S.conn:exec(sql)
			if not ok then
				rollback()
				return nil, "setup statement " .. i .. " failed: " .. err, code, true
			end
		end
		ok, err, code = x("COMMIT")
		if not ok then return nil, err, code end
	end
	S.setup_done[rt.cp] = true
	return true
end

local function set_status(def, part, status, msg)
	x([[UPDATE projhost.checkpoints SET status = $3, error = $4, updated_at = now()
		WHERE projection = $1 AND partition = $2]], of(def).cp, part, status, msg)
end

-- Version changed (or `projhost reset` set it to 0): run the reset SQL,
-- forget every state and checkpoint of the projection, start over. Runs
-- in its own transaction under the projection's exclusive advisory lock,
-- which batches of partitioned projections hold shared.
local function reset_projection(def)
	local rt = of(def)
	local ok, err, code = x("BEGIN")
	if ok then ok, err, code = x("SELECT pg_advisory_xact_lock(hashtext('projhost:' || $1))", rt.cp) end
	local rows
	if ok then
		rows, err, code = q([[SELECT version FROM projhost.checkpoints
			WHERE projection = $1 AND partition = '' FOR UPDATE]], rt.cp)
		ok = rows
	end
	if not ok then return nil, err, code end
	local old = rows[1] and tonumber(rows[1].version)
	if old == def.version then return x("COMMIT") end -- another worker did it
	for i, sql in ipairs(def.reset) do
		ok, err, code = S.conn:exec(sql)
		if not ok then
			rollback()
			return nil, "reset statement " .. i .. " failed: " .. err, code, true
		end
	end
	ok, err, code = x("DELETE FROM projhost.checkpoints WHERE projection = $1 AND partition <> ''", rt.cp)
	-- what it skipped, parked and held, its timers and how much it applied
	-- belong to the old version: the rebuild applies every event again (one
	-- that fails again is parked anew, so a `parked retry` of an old dead
	-- letter would apply its event twice) and schedules its own timers (a
	-- tick starts over)
	local dropped = 0
	if ok then ok, err, code = x("DELETE FROM projhost.skipped WHERE projection = $1", rt.cp) end
	if ok then ok, err, code = x("DELETE FROM projhost.timers WHERE projection = $1", rt.cp) end
	if ok then ok, err, code = timers.arm(def, x) end
	if ok then
		ok, err, code = q("WITH d AS (DELETE FROM projhost.parked WHERE projection = $1 RETURNING 1) "
			.. "SELECT count(*) AS n FROM d", rt.cp)
		if ok then dropped = tonumber(ok[1].n) end
	end
	if ok then
		ok, err, code = x("UPDATE projhost.sources SET applied = 0, version = $2 WHERE projection = $1",
			rt.cp, def.version)
	end
	if ok then
		ok, err, code = x([[UPDATE projhost.checkpoints SET version = $2, state = NULL, last_tx = '0',
			last_pos = 0, status = 'running', error = NULL, updated_at = now()
			WHERE projection = $1 AND partition = '']], rt.cp, def.version)
	end
	if ok then ok, err, code = x("COMMIT") end
	if not ok then return nil, err, code end
	forget_caught(rt.cp)
	log("info", rt.cp, string.format("version %s -> %d: reset, rebuilding from the start%s",
		tostring(old), def.version, dropped > 0
			and string.format(" (dropped %d parked event%s of the old version)", dropped, dropped == 1 and "" or "s")
			or ""))
	return true
end

-- S.relist is set when the master's list of projections is out of date (a
-- shadow was switched over, a definition must be registered as a shadow):
-- the reply then carries a "relist" line and the master reloads every
-- worker.

-- Another worker switched the shadow def over: serve it under its name.
local function adopt_promoted(def)
	local rt = of(def)
	S.defs[rt.cp] = nil
	rt.cp, rt.shadow_of = rt.shadow_of, nil
	S.defs[rt.cp] = def
	S.setup_done[rt.cp] = true
	forget_caught(rt.cp)
	S.relist = true
end

-- The shadow def caught up: in one transaction, drop the serving
-- version's state and checkpoints and give the shadow's rows its name.
-- Batches of the old version in flight finish first (their locks).
local function promote(def)
	local rt = of(def)
	local name, shadow = rt.shadow_of, rt.cp
	local ok, err, code = x("BEGIN")
	if ok then ok, err, code = x("SELECT pg_advisory_xact_lock(hashtext('projhost:' || $1))", name) end
	if ok then ok, err, code = x("SELECT pg_advisory_xact_lock(hashtext('projhost:' || $1))", shadow) end
	if ok then
		ok, err, code = q([[SELECT 1 FROM projhost.checkpoints WHERE projection = $1 AND partition = ''
			FOR UPDATE]], name)
	end
	if ok then ok, err, code = x("DELETE FROM projhost.checkpoints WHERE projection = $1", name) end
	if ok then
		ok, err, code = x("UPDATE projhost.checkpoints SET projection = $1 WHERE projection = $2", name, shadow)
	end
	-- the serving version's dead letters go with it (see reset_projection)
	if ok then ok, err, code = x("DELETE FROM projhost.parked WHERE projection = $1", name) end
	if ok then
		ok, err, code = x("UPDATE projhost.parked SET projection = $1 WHERE projection = $2", name, shadow)
	end
	-- its source, skips, samples and timers go with it
	for _, t in ipairs({ "sources", "skipped", "samples", "timers" }) do
		if ok then ok, err, code = x("DELETE FROM projhost." .. t .. " WHERE projection = $1", name) end
		if ok then
			ok, err, code = x("UPDATE projhost." .. t .. " SET projection = $1 WHERE projection = $2", name, shadow)
		end
	end
	if ok then
		ok, err, code = x("UPDATE projhost.sources SET shadow_of = NULL WHERE projection = $1", name)
	end
	if ok then ok, err, code = x("COMMIT") end
	if not ok then return nil, err, code end
	log("info", name, string.format("version %d caught up in the shadow: switched over", def.version))
	adopt_promoted(def)
	return true
end
M.promote = promote

-- setup or reset SQL failed: the projection's own SQL is wrong (it fails
-- until the file is fixed), unless the database itself was the problem.
-- Logged once per load (def), reload or resume: until then every job of
-- the projection answers "failed" without trying again (of(def).setup_failed).
local function script_failed(def, err, code, is_script)
	local rt = of(def)
	if not is_script then return "dberror", dberror(def, err, code) end
	log("error", rt.cp, def.file .. ": " .. err)
	set_status(def, "", "failed", err)
	rt.setup_failed = true
	return "failed", 0
end

-- Stalled projections (projhost.stall_news: behind, and no progress for
-- PROJHOST_STALL_AFTER seconds) are logged once, by whichever worker of
-- any instance looks first. A look computes every projection's lag (about
-- a second with 1,000,000 partitions), so there is one every
-- STALL_LOOK_EVERY seconds in all: at most half the stall time late.
local STALL_LOOK_EVERY = math.max(PROGRESS_EVERY, STALL_AFTER / 2)
local stall_look_at = 0
check_stalls = function()
	local now = core.monotime()
	if now - stall_look_at < PROGRESS_EVERY then return end
	stall_look_at = now
	local rows = q("SELECT projection, events_behind, lag_seconds FROM projhost.stall_news($1, $2)",
		STALL_AFTER, STALL_LOOK_EVERY)
	for _, r in ipairs(rows or {}) do
		log("warn", r.projection, string.format("stalled: %s events behind, the oldest %.0fs old, and "
			.. "nothing applied for %gs (PROJHOST_STALL_AFTER); is a batch blocked on a lock?",
			r.events_behind, tonumber(r.lag_seconds) or 0, STALL_AFTER))
	end
end

-- Connect, run setup, check the projection's own row: the part every
-- job starts with. Returns true, or status, delay for the whole job.
local function prepare(def)
	local rt = of(def)
	if not ensure_conn() then return "dberror", backoff() end
	local ok, err, code, is_setup
	local rows
	if rt.shadow_of then
		-- switched over meanwhile by another worker or instance?
		rows = q("SELECT version FROM projhost.checkpoints WHERE projection = $1 AND partition = ''",
			rt.shadow_of)
		if rows and rows[1] and tonumber(rows[1].version) == def.version then
			adopt_promoted(def)
			return "idle", 0
		end
	end
	if rt.setup_failed then
		-- still failed, or resumed by an operator (then try again)
		rows = q("SELECT status FROM projhost.checkpoints WHERE projection = $1 AND partition = ''", rt.cp)
		if rows and rows[1] and rows[1].status == "failed" then return "failed", 0 end
		rt.setup_failed = nil
	end
	ok, err, code, is_setup = ensure_setup(def)
	if not ok then return script_failed(def, err, code, is_setup) end
	rows, err, code = q([[SELECT version, status FROM projhost.checkpoints
		WHERE projection = $1 AND partition = '']], rt.cp)
	if not rows then return "dberror", dberror(def, err, code) end
	local row = rows[1]
	if not row then S.setup_done[rt.cp] = nil; return "more", 0 end
	local stored = tonumber(row.version)
	if stored ~= def.version then
		local newer = S.defs[rt.cp .. "@" .. stored]
		if newer and of(newer).shadow_of == rt.cp then
			-- our shadow was switched over elsewhere: serve it
			adopt_promoted(newer)
			return "more", 0
		end
		if stored ~= 0 and def.rebuild == "shadow" then
			-- new code that must rebuild in the shadow: re-register
			S.relist = true
			return "retry", 0.2
		end
		if stored > def.version then
			-- another host already runs a newer version: do not reset it back
			log("warn", rt.cp, string.format("stored version %d is newer than %s (version %d); not touching it",
				stored, def.file, def.version))
			return "retry", 5
		end
		ok, err, code, is_setup = reset_projection(def)
		if not ok then return script_failed(def, err, code, is_setup) end
		return true, "reset"
	end
	if row.status ~= "running" then return row.status, 0 end
	retry_parked(def)
	check_stalls()
	return true
end
M.prepare = prepare

-- seconds for people ("2m10s"), the CLI's rule
local duration = require("projhost.units").duration

-- A catch-up's progress, from projhost.projection_status (every worker's
-- samples): applied in the last minute, events/s, remaining, ETA. The
-- exact count costs a scan of the source's streams and the checkpoints
-- (0.5 s of the server with 1,000,000 partitions: a tenth of a catch-up's
-- server time if taken every PROGRESS_EVERY s), so this worker looks at
-- most every PROGRESS_LOOK_EVERY s and the lines between go on from its
-- last look at its rate, marked "~" as estimates.
local PROGRESS_LOOK_EVERY = 30
local function progress_line(def)
	local rt = of(def)
	local now = core.monotime()
	local what = rt.shadow_of and "rebuilding" or "catching up"
	local look = rt.progress_look
	if look and now - look.at < PROGRESS_LOOK_EVERY and look.rate > 0 then
		local left = math.max(0, look.behind - look.rate * (now - look.at))
		log("info", rt.cp, string.format("%s: applied ~%.0f in the last minute, ~%.0f events/s, ~%.0f remaining, "
			.. "ETA ~%s", what, look.rate * 60, look.rate, left, duration(left / look.rate)))
		return
	end
	local rows = q([[SELECT applied_1m, rate_1m, events_behind, behind_estimated, eta_seconds
		FROM projhost.projection_status($1, $2)]], rt.cp, STALL_AFTER)
	local r = rows and rows[1]
	if not r then return end
	local eta = tonumber(r.eta_seconds)
	rt.progress_look = { at = now, behind = tonumber(r.events_behind) or 0, rate = tonumber(r.rate_1m) or 0 }
	log("info", rt.cp, string.format("%s: applied %s in the last minute, %.0f events/s, %s%s remaining, ETA %s",
		what, r.applied_1m, tonumber(r.rate_1m) or 0,
		r.behind_estimated == "t" and "~" or "", r.events_behind, eta and duration(eta) or "unknown"))
end

-- The applied count goes to projhost.samples every SAMPLE_EVERY seconds
-- (status shows rates and ETAs from them, whichever node asks); a run of
-- work longer than PROGRESS_EVERY seconds gets a progress line every
-- PROGRESS_EVERY seconds (one for all workers and instances: note_applied
-- says whose turn it is).
local function sample(def, p, now, flush)
	if p.sn == 0 and not flush then return end
	if now - p.sat < SAMPLE_EVERY and not flush then return end
	local conn = S.conn
	if not conn or not conn:ok() or conn:in_transaction() then return end
	local busy = p.busy_since and now - p.busy_since >= PROGRESS_EVERY
	local rows, err = q("SELECT projhost.note_applied($1, $2, now() - $3 * interval '1 second', $4) AS due",
		of(def).cp, p.sn, now - p.sat, busy and PROGRESS_EVERY or nil)
	if not rows then
		log("debug", of(def).cp, "note_applied: " .. tostring(err))
		return
	end
	p.sn, p.sat = 0, now
	if rows[1] and rows[1].due == "t" then progress_line(def) end
end

-- One "applied" line per projection per second at most, so a catch-up of
-- millions of events does not flood the log and a live event still shows.
-- fields: the log record's (core.log), e.g. { position = where the batch ended }
local function report(def, n, fields, force)
	local rt = of(def)
	local p = progress[rt.cp]
	local now = core.monotime()
	if not p then p = { at = 0, n = 0, sn = 0, sat = now, last = 0 }; progress[rt.cp] = p end
	p.n, p.sn = p.n + n, p.sn + n
	if n > 0 then
		-- a run of work: events applied with no pause of SAMPLE_EVERY s
		if not p.busy_since or now - p.last > SAMPLE_EVERY then p.busy_since = now end
		p.last = now
	end
	-- timers the batches fired (worker/timers.lua), in the same line
	local t = S.fired_log[rt.cp]
	if (p.n > 0 or t) and (force or now - p.at >= 1) then
		local fired = t and string.format("fired %d timer%s", t, t == 1 and "" or "s")
		log("info", rt.cp, (p.n == 0 and fired) or (string.format("applied %d event%s", p.n, p.n == 1 and "" or "s")
			.. (fired and ", " .. fired or "")), fields)
		p.at, p.n = now, 0
		S.fired_log[rt.cp] = nil
	end
	-- caught up (force): the last count now, and the run is over
	sample(def, p, now, force and p.sn > 0)
	if force then p.busy_since, rt.progress_look = nil, nil end
end
M.report = report

-- The caught_up hook, in a transaction of its own after the batch that
-- caught up committed (a failing hook never undoes a batch): its failure
-- is logged and shown in status, and it runs again at the next catch-up.
local function run_caught_up(def)
	local rt = of(def)
	if not def.caught_up then return true end
	local ctx = ctx_for(def)
	local o = overrun_at(def, 0, HOOKS)
	local ok, err
	if o then
		overrun_clear(def, 0)
		ok, err = false, "caught_up " .. tostring(o.reason)
	else
		if not x("BEGIN") then return false end
		S.failed_sql = nil
		ctx._discard()
		core.beat(0, "caught_up")
		ok, err = guard.call(def.budget, def.caught_up, ctx)
		core.beat()
		if ok then ok, err = ctx._flush() end
		if ok and S.failed_sql then ok, err = false, "SQL error (caught by the hook): " .. S.failed_sql end
		if ok then ok, err = x("COMMIT") end
		if not ok then rollback() end
		-- what the hook SET stays with the connection otherwise (see transact)
		if S.conn and S.conn:ok() then
			x("RESET ALL")
			x(SESSION_SQL, unpack(SESSION_PARAMS))
		end
	end
	if not ok then
		local msg = "caught_up failed: " .. first_line(err)
		log("error", rt.cp, def.file .. ": " .. msg)
		x([[UPDATE projhost.checkpoints SET error = $2, updated_at = now()
			WHERE projection = $1 AND partition = '']], rt.cp, msg)
		return false
	end
	return true
end

-- Nothing behind any more: log it and run the caught_up hook, once per
-- transition.
local function caught_up_partitioned(def)
	local rt = of(def)
	local key = rt.cp .. "\t*"
	if caught[key] then return end
	caught[key] = true
	if ASYNC_CATCHUP then
		-- the catch-up's jobs may have committed without waiting for
		-- their WAL flush (see open_parts), on any worker: a write that
		-- waits for its own flush covers every commit before it, so a
		-- caught-up projection is on disk
		x("UPDATE projhost.checkpoints SET updated_at = now() WHERE projection = $1 AND partition = ''", rt.cp)
	end
	log("info", rt.cp, "caught up (every partition)")
	local p = progress[rt.cp]
	if p then
		sample(def, p, core.monotime(), p.sn > 0)
		p.busy_since = nil
	end
	run_caught_up(def)
end
M.run_caught_up, M.caught_up_partitioned = run_caught_up, caught_up_partitioned

local function file_exists(path)
	local f = io.open(path, "r")
	if f then f:close() end
	return f ~= nil
end

-- Stored versions of the projections' own rows, when the database answers:
-- a definition whose version differs and rebuilds in the shadow runs under
-- "NAME@VERSION" beside the serving one (see promote()).
local function stored_versions()
	if not ensure_conn() then return {} end
	local rows = q("SELECT projection, version FROM projhost.checkpoints WHERE partition = ''")
	local out = {}
	for _, r in ipairs(rows or {}) do out[r.projection] = tonumber(r.version) end
	return out
end

-- (Re)load every file: new definitions replace old ones between batches; a
-- file that fails to load keeps its previous definition (the error names
-- file:line); a file that is gone stops its projection (state kept).
-- Returns the answer for the master.
local function load_all()
	local list, errors = loader.load_paths(S.paths)
	local previous = S.defs
	local stored = stored_versions()
	local out = {}
	local loaded_files = {}
	for _, def in ipairs(list) do loaded_files[def.file] = true end
	S.defs = {}
	local by_name = {}
	for _, def in ipairs(list) do by_name[def.name] = def end
	-- keep the previous version of files that exist but failed to load
	for _, old in pairs(previous) do
		if not loaded_files[old.file] and file_exists(old.file) and not by_name[old.name] then
			by_name[old.name] = old
			of(old).kept = true
		end
	end
	for _, e in ipairs(errors) do
		local kept = ""
		for _, old in pairs(previous) do
			if of(old).kept and e:sub(1, #old.file + 1) == old.file .. ":" then kept = old.name end
		end
		out[#out + 1] = wire.line("error", wire.truncate(e, wire.ERROR_MAX), kept)
	end
	for name, def in pairs(by_name) do
		local rt = of(def)
		rt.kept = nil
		events.compile(def)
		rt.cp, rt.shadow_of = name, nil
		local sv = stored[name]
		if sv and sv ~= 0 and sv ~= def.version and def.rebuild == "shadow" then
			-- rebuild in the shadow; the old code keeps serving if we have it
			rt.cp, rt.shadow_of = name .. "@" .. def.version, name
			local old = previous[name]
			if old and old.version == sv and old ~= def then
				of(old).cp = name
				S.defs[name] = old
			end
		end
		S.defs[rt.cp] = def
	end
	S.setup_done = {}
	for cp, def in pairs(S.defs) do
		local kind = def.from.all and "all" or def.from.stream and "stream" or "category"
		local value = def.from.stream or def.from.category or ""
		local budget = def.budget
		local line = wire.line("proj", cp, kind, value, def.partition and "1" or "0", tostring(budget), def.hash)
		if #line > wire.BUDGET then
			-- a name or source of megabytes would push the answer past
			-- the frame limit: refused like a file that fails to load
			S.defs[cp] = nil
			line = wire.line("error", wire.truncate(string.format(
				"%s: the projection's name or source is too long (%d bytes)", def.file, #line), wire.ERROR_MAX), "")
		end
		out[#out + 1] = line
	end
	out[#out + 1] = "ready"
	return table.concat(out, "\n")
end
M.load_all = load_all

return M
