-- Parked retries: `projhost parked retry` flagged parked events of def:
-- run each again, in its own transaction under its partition's lock,
-- against the partition's current state. Success removes it from the dead
-- letters; failure parks it again with the new error. Checked at most once
-- a second per projection.
local core = require "projhost.core"
local P = require "projhost.projection"
local S = require "projhost.worker.state"
local session = require "projhost.worker.session"
local events = require "projhost.worker.events"
local ctxm = require "projhost.worker.ctx"
local failure = require "projhost.worker.failure"
local transact = require "projhost.worker.transact"

local log, first_line = session.log, session.first_line
local q, x, rollback = session.q, session.x, session.rollback
local load_event, lock_checkpoint = events.load_event, failure.lock_checkpoint
local pipe_begin, state_tag = ctxm.pipe_begin, transact.state_tag
local json = P.json
local of = S.of
local parked_checked = S.parked_checked

local M = {}

local function store_parked(job, states)
	local part = job.groups[1].part
	-- a parked event's handler may finish its partition (ctx:done) too
	local done = of(job.def).ctx._done
	S.conn:send_as(state_tag(job), [[UPDATE projhost.checkpoints SET state = $3::jsonb,
		status = CASE WHEN $4 THEN 'done' ELSE status END, updated_at = now()
		WHERE projection = $1 AND partition = $2]], of(job.def).cp, part, states[1],
		done and done[part] ~= nil or false)
end

local function retry_parked(def)
	local rt = of(def)
	local now = core.monotime()
	if now - (parked_checked[rt.cp] or 0) < 1 then return end
	parked_checked[rt.cp] = now
	local list = q([[SELECT id, partition, global_position FROM projhost.parked
		WHERE projection = $1 AND retry_requested ORDER BY global_position LIMIT 100]], rt.cp)
	if not list or #list == 0 then return end
	for _, p in ipairs(list) do
		local ok = x("BEGIN")
		local row = ok and lock_checkpoint(def, p.partition)
		local claimed = row and q([[DELETE FROM projhost.parked WHERE id = $1 AND retry_requested
			RETURNING id]], p.id)
		local e = claimed and #claimed == 1 and load_event(p.global_position)
		if not e then
			rollback() -- partition busy, claimed by another worker, or the event is gone
		else
			e.index, e.partition = 1, p.partition
			local state = row.state and json.decode(row.state)
			local job = { def = def, store = store_parked, events = { e },
				groups = { { part = p.partition, state = state, i0 = 1, i1 = 1 } } }
			pipe_begin()
			local o = transact.transact(def, job)
			if not o then
				log("info", rt.cp, "parked event applied on retry", session.event_fields(e))
				-- the partition's state changed under the worker's cache
				rt.last = nil
			else
				rollback()
				local msg = first_line(o.err or o.status)
				log("error", rt.cp, "parked event failed again: " .. msg, session.event_fields(e))
				x([[UPDATE projhost.parked SET retry_requested = false, attempts = attempts + 1,
					error = $2, parked_at = now() WHERE id = $1]], p.id, msg)
			end
		end
	end
end
M.retry_parked = retry_parked

return M
