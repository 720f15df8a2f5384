-- The worker's side of the master/worker messages (core/proto.h has the
-- grammar; projhost.wire the lines): init, reload, job, find, quit, the
-- answers, and the worker's loop (core.serve).
local core = require "projhost.core"
local config = require "projhost.config"
local wire = require "projhost.wire"
local S = require "projhost.worker.state"
local session = require "projhost.worker.session"
local lifecycle = require "projhost.worker.lifecycle"
local page = require "projhost.worker.page"
local parts_m = require "projhost.worker.parts"
local discovery = require "projhost.worker.discovery"
local timers = require "projhost.worker.timers"
local stream_in_source = require("projhost.worker.events").stream_in_source

local log, rollback, end_orphan = session.log, session.rollback, session.end_orphan
local load_all, promote, caught_up_partitioned =
	lifecycle.load_all, lifecycle.promote, lifecycle.caught_up_partitioned
local run_batch, run_partitions = page.run_batch, parts_m.run_partitions
local find_partitions, walk_token = discovery.find_partitions, discovery.walk_token
local of = S.of
local caught, overrun = S.caught, S.overrun

local M = {}

local function init(fields)
	S.dsn = fields[2]
	S.paths = {}
	for i = 3, #fields do S.paths[#S.paths + 1] = fields[i] end
	return load_all()
end

-- The answer to a job lists the partitions it was given (so it is bounded
-- by the job, which the master bounds by bytes).

local function job(name, parts)
	local def = S.defs[name]
	local out = {}
	if not def then
		-- the master's list is older than ours (reload): nothing to do
		out[1] = wire.line("done", name, 0)
		for _, p in ipairs(parts) do out[#out + 1] = wire.line("part", p, "idle", 0) end
	elseif def.partition then
		local n, results = run_partitions(def, parts)
		out[1] = wire.line("done", name, n)
		-- in the job's order (the master finds each entry where it put
		-- it), then any the worker added (see run_partitions)
		for _, p in ipairs(parts) do
			local r = results[p]
			if r then
				-- no delay is nearly every answer (a float formatted per
				-- partition showed in profiles of 1,000,000 of them)
				local d = r[2]
				out[#out + 1] = wire.line("part", p, r[1], (d and d ~= 0) and string.format("%.3f", d) or "0")
				results[p] = nil
			end
		end
		for p, r in pairs(results) do
			out[#out + 1] = wire.line("part", p, r[1], string.format("%.3f", r[2] or 0))
		end
	else
		local status, n, delay = run_batch(def)
		out[1] = wire.line("done", name, n or 0)
		out[2] = wire.line("part", "", status, string.format("%.3f", delay or 0))
	end
	-- when the projection's next timer is due (worker/timers.lua)
	out[#out + 1] = def and timers.due_line(wire, name) or nil
	out[#out + 1] = def and timers.fired_line(wire, name) or nil
	return table.concat(out, "\n")
end

local function find(name, token)
	local def = S.defs[name]
	if not def or not def.partition then return wire.line("found", name, "idle", "") end
	local status, list, next_token, found, walk, applied = find_partitions(def, token)
	-- partitions caught up by the round itself (worker/catchup.lua): a
	-- catch-up, whose end is logged and flushed (caught_up_partitioned)
	if applied and applied > 0 then caught[of(def).cp .. "\t*"] = nil end
	-- (its timers are looked at only when the projection could be)
	local looked = status == "more" or status == "idle"
	if not looked then
		-- paused, stopped, failed, dberror: the master waits for a wake-up
		-- (or the fallback poll) before looking again, from where it was
		status, next_token = "idle", token
	elseif status == "idle" and not found and of(def).shadow_of then
		-- a whole round found nothing behind
		if not promote(def) then status = "more" end
	elseif status == "idle" and not found then
		caught_up_partitioned(def)
	elseif #list > 0 then
		caught[of(def).cp .. "\t*"] = nil
	end
	-- the partitions with due timers, after the streams behind (one index
	-- read of projhost.timers), and when the next one is due
	local due = {}
	if looked then
		local listed = {}
		for _, s in ipairs(list) do listed[s] = true end
		for _, p in ipairs(timers.find_due(def) or {}) do
			-- (a stream the source no longer reads, after a reload: its
			-- timers wait, as its checkpoint does)
			if not listed[p] and stream_in_source(def, p) then listed[p] = true; due[#due + 1] = p end
		end
	end
	-- bounded by bytes as well as by count. A walk's page stops at the
	-- budget and goes on after the last stream included; a window's streams
	-- left out are still behind when the next round looks (it starts
	-- before the first of them), so nothing is skipped either way
	local out, bytes, last = { "" }, 0, nil
	for _, s in ipairs(list) do
		local line = wire.line("part", s)
		if #line > wire.BUDGET then
			log("error", of(def).cp, string.format("a stream name of %d bytes is too long to be processed; left behind", #s))
			last = s
		elseif bytes + #line + 1 > wire.BUDGET then
			if walk then
				next_token, status = walk_token(walk.xmin, true, walk.t, last or walk.stream), "more"
			end
			break
		else
			out[#out + 1] = line
			bytes, last = bytes + #line + 1, s
		end
	end
	for _, p in ipairs(due) do
		-- (one that does not fit is listed by the next look)
		local line = wire.line("part", p)
		if bytes + #line + 1 > wire.BUDGET then break end
		out[#out + 1] = line
		bytes = bytes + #line + 1
	end
	out[1] = wire.line("found", name, status, next_token)
	out[#out + 1] = timers.due_line(wire, name)
	-- timers fired by the round's own batches: a chunk that did not commit
	-- runs as a job here, with its partitions' due timers (/metrics missed
	-- 200 of 1,000 when only a job's answer said so)
	out[#out + 1] = timers.fired_line(wire, name)
	-- events the round applied itself (worker/catchup.lua): counted as a
	-- batch's (--once's rounds, metrics, waiters of GET /wait)
	if applied and applied > 0 then out[#out + 1] = wire.line("done", name, applied) end
	return table.concat(out, "\n")
end

-- The "overrun" lines of a job: projection name -> { [position] = { kind =,
-- reason = } } for this job only (S.overrun; see failure.lua).
local function overruns_of(lines)
	local o
	for i = 2, #lines do
		local l = lines[i]
		local pos = l[1] == "overrun" and tonumber(l[2])
		if pos then
			o = o or {}
			o[pos] = { kind = l[3] or "handler", reason = l[4] or "" }
			end_orphan(tonumber(l[5]))
		end
	end
	return o
end

-- The "fails" lines (proto.h) of the error actions given since the last
-- answer, appended to reply.
local function with_fails(reply)
	if not next(S.fails) then return reply end
	local out = { reply }
	for key, n in pairs(S.fails) do
		local name, action = key:match("^(.*)\t(%a+)$")
		out[#out + 1] = wire.line("fails", name, action, n)
	end
	S.fails = {}
	return table.concat(out, "\n")
end

function M.handle(msg)
	local lines = wire.parse(msg)
	local f = lines[1] or {}
	local verb = f[1]
	if verb == "job" then
		local parts = {}
		for i = 3, #f do parts[#parts + 1] = f[i] end
		if #parts == 0 then parts[1] = "" end
		overrun[f[2]] = overruns_of(lines)
		local reply = job(f[2], parts)
		if S.relist then reply, S.relist = reply .. "\n" .. wire.line("relist"), false end
		reply = with_fails(reply)
		-- after "not enough memory" this state cannot be trusted: answer,
		-- then exit so the master starts a fresh worker
		return reply, S.out_of_memory
	elseif verb == "find" then
		overrun[f[2]] = overruns_of(lines)
		local reply = find(f[2], f[3] or "")
		if S.relist then reply, S.relist = reply .. "\n" .. wire.line("relist"), false end
		return with_fails(reply)
	elseif verb == "init" then
		return init(f)
	elseif verb == "reload" then
		return load_all()
	elseif verb == "quit" then
		rollback()
		return nil
	end
	error("unknown verb from the master: " .. tostring(verb))
end

function M.main()
	return core.serve(core.WORKER_PIPE_FD, M.handle, core.WORKER_BEAT_FD, config.get("PROJHOST_WORKER_MEMORY_MB"))
end

return M
