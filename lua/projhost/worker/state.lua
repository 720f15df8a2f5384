-- The worker's runtime state, in one place: what the files of
-- projhost.worker share (the connection, the pipeline of the batch in
-- flight, the definitions served, ...) and, per definition, what the worker
-- keeps about it (of(def)). The definitions themselves stay as the loader
-- made them.
local S = {}

S.dsn = nil
S.conn = nil
S.defs = {}            -- checkpoint name -> def
S.setup_done = {}      -- checkpoint name -> true once setup ran on this connection
S.db_down = false      -- the database is unreachable (logged once per outage)
S.db_failures = 0      -- our own statements' failures in a row (see session.backoff)
S.caught = {}          -- "name\tpartition" -> true while caught up
S.progress = {}        -- name -> { at = monotime of the last line, n = events since }
S.running = nil        -- the definition whose job runs (print names it)
S.planner_session = {} -- the session's values of reads.PLANNER, read when the connection opens
S.paths = {}           -- the paths served

-- The batch in flight (see ctx.lua, where pipe's fields are described).
S.pipe = { on = false, first = nil }
S.cur = 0              -- index of the event whose handler runs (0: none)
S.failed_sql = nil     -- first SQL error seen while running the current event

-- Events whose code overran its budget or killed its worker (see failure.lua).
S.overrun = {}
S.out_of_memory = false
-- "checkpoint name\taction" -> failed events given that action since the
-- last answer (protocol.lua sends them as "fails" lines; failure.lua counts)
S.fails = {}
-- The master's list of projections is out of date (see lifecycle.lua).
S.relist = false
-- checkpoint name -> monotime of the last look for parked retries
S.parked_checked = {}
-- checkpoint name -> seconds to its next timer, for the answer's "due"
-- line (worker/timers.lua)
S.timer_due = {}
-- checkpoint name -> timers fired since the last "applied" log line / the
-- last answer's "fired" line
S.fired_log, S.fired = {}, {}
-- checkpoint rows this worker created, and when it analyzes (see parts.lua)
S.new_checkpoints, S.analyze_at = 0, 1000
-- the discovery walk's next page, read ahead by the last one (discovery.lua):
-- { def, after = the stream it goes on after, rows }
S.walk_ahead = nil

-- Per definition (weak keys: a definition replaced by a reload goes with
-- its entry):
--   cp, shadow_of    the checkpoint name it runs under; the name it
--                    rebuilds in the shadow of (see lifecycle.load_all)
--   ctx              its ctx (see ctx.ctx_for)
--   read_sql, read_params, held_sql, held_params   its reads (events.compile)
--   last             what the worker committed last (see page.open_page)
--   batch            events its next page reads (see page.batch_for)
--   ok_at            monotime of the last full check (lifecycle.prepare)
--   setup_failed     setup or reset SQL failed (lifecycle.script_failed)
--   kept             the previous load kept, its file failing (load_all)
local per = setmetatable({}, { __mode = "k" })

function S.of(def)
	local t = per[def]
	if not t then
		t = {}
		per[def] = t
	end
	return t
end

return S
