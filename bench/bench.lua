-- bench/bench.lua: `make bench` (issue 6). projhost next to what PostgreSQL
-- itself delivers, measured in one run on a throwaway cluster.
--
--   luajit bench/bench.lua        (from the repository root, after `make
--                                 build bench/limit`; `make bench` does both)
--
-- Prints one table and writes bench/results.json. Every figure is the
-- median of 3 runs, within a time allowance per row so the whole bench
-- stays under 10 minutes on 2 cores: a row whose runs are so slow that the
-- next one would not fit is reported from the runs it had (the table's
-- "runs" column says how many), and a run that exceeds what is left is
-- killed: its figure reads "timeout" with the rate it reached until then.
-- Nothing here is part of `make test`; targets are printed beside the
-- figures, never asserted.
--
-- Environment: BENCH_RUNS (default 3), BENCH_SCALE (default 1; smaller for
-- a quick check of the harness), BENCH_KEEP=1 keeps the cluster's
-- directory (and leaves the cluster running) for a look afterwards,
-- BENCH_ONLY=row,group,... runs only those rows (see GROUPS below).
--
-- Rows 8-12 (issue 11) are the same work at scale: a 3,000,000-event
-- store, 1,000,000 streams, concurrent and bulk appends; the rows that
-- load or read a large store run once, within their own timeout.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath

local ffi = require "ffi"
local core = require "projhost.core"
local proc = require "projhost.proc"
local cjson = require "cjson"

local RUNS = tonumber(os.getenv("BENCH_RUNS")) or 3
-- BENCH_SCALE=0.05 shrinks the data sets and the live run (a quick check
-- of the harness itself; the figures then mean little)
local SCALE = tonumber(os.getenv("BENCH_SCALE")) or 1
local N_STREAMS = 10000           -- rows 1-3: 1,000,000 events over 10,000 streams
local N_EVENTS = math.floor(1000000 * SCALE / N_STREAMS) * N_STREAMS
local P_STREAMS = math.floor(100000 * SCALE) -- row 4: 100,000 streams x 10 events
local P_PER_STREAM = 10
local LIVE_RATE, LIVE_SECONDS = 500, math.max(2, math.floor(20 * SCALE))
local NOTIFY_N = 1000

-- Seconds each row may take for all its runs (see the top). Today's slow
-- rows (per-event SQL) fit one or two runs; once they are fast, all three.
-- Together with the fixed parts (loading ~30 s, live latency ~80 s, the
-- rest ~15 s) they add up to just under 10 minutes in the worst case.
local ALLOW = {
	limit_read = 20, state_only = 40,
	limit_pipeline = 80, read_model_exec = 100, limit_setupsert = 35, read_model_upsert = 90,
	partitioned_w1 = 60, partitioned_w2 = 60,
}
local T_LIMIT = 60 -- any other single run of bench/limit

-- Issue 11's rows (8-12): the same events in a large store, a small share
-- of it, many streams, concurrent and bulk appends. Their sizes follow
-- BENCH_SCALE too; where they are smaller than the issue's the table's
-- label says so.
local STORE_N = math.floor(3000000 * SCALE / 100) * 100 -- rows 8-11: one store of 3,000,000 events
local WIDE_STREAMS = math.floor(1000000 * SCALE)        -- row 10: its 1,320,000 "wide" events
local DEEP_STREAMS = math.floor(100000 * SCALE)         -- ... and 1,350,000 "deep" ones
local STORE_LIVE_SECONDS = math.max(2, math.floor(8 * SCALE)) -- row 9: 8 s (row 5: 20 s)
local PGBENCH_SECONDS = math.max(2, math.floor(2 * SCALE))     -- row 11: each of 20 runs
local PGBENCH_CLIENTS = 8
-- row 12: 50,000 and 500,000 lines (the issue's 100,000 and 1,000,000 do
-- not fit the 10 minutes: the large file alone takes 40-120 s)
local FILE_LINES = { math.floor(50000 * SCALE), math.floor(500000 * SCALE) }
local FILE_FULL = { 100000, 1000000 }
local FILE_STREAMS = 10000
-- row 8-12 allowances (seconds for all runs of a row, or the one run of a
-- large one): loading (~60 s at scale 1) comes on top
local ALLOW_NEW = {
	store_all_cold = 25, store_all = 25,
	share10_own = 10, share10 = 15, share1_own = 5, share1 = 8, types1_own = 5, types1 = 8,
	partitioned_wide = 30, partitioned_deep = 30,
	file_small = 15, file_large = 35,
}

-- BENCH_ONLY=name,name: run only these rows (a row's name as in
-- bench/results.json, or a group's: main, partitioned, live, reload,
-- store, streams, pgbench, file), e.g. BENCH_ONLY=share10,share10_own.
-- Only the data sets those rows need are loaded.
local GROUPS = {
	main = { "limit_read", "state_only", "limit_pipeline", "read_model_exec", "limit_setupsert",
		"read_model_upsert" },
	partitioned = { "partitioned_w1", "partitioned_w2" },
	live = { "notify", "live" },
	reload = { "reload" },
	store = { "store_all_cold", "store_all", "share10_own", "share10", "share1_own", "share1",
		"types1_own", "types1", "store_live" },
	streams = { "partitioned_deep", "partitioned_wide" },
	pgbench = { "append_empty", "append_empty_nonotify", "append_store", "append_store_nonotify" },
	file = { "file_small", "file_large" },
	ops = { "status_1m", "status_behind_1m", "wait_for", "metrics" },
}
local ONLY
do
	local v = os.getenv("BENCH_ONLY")
	if v and v:match("%S") then
		ONLY = {}
		local known = {}
		for g, list in pairs(GROUPS) do
			known[g] = true
			for _, r in ipairs(list) do known[r] = true end
		end
		for name in v:gmatch("[^,%s]+") do
			if not known[name] then
				io.stderr:write("bench: BENCH_ONLY: no row or group named ", name, "\n")
				os.exit(2)
			end
			for _, r in ipairs(GROUPS[name] or { name }) do ONLY[r] = true end
		end
	end
end

-- wanted(label) -> should this row run? wanted_any(group) -> any of its rows?
local function wanted(label)
	return not ONLY or ONLY[label] == true
end
local function wanted_any(group)
	for _, r in ipairs(GROUPS[group]) do
		if wanted(r) then return true end
	end
	return false
end

ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
int clock_gettime(int clk, bench_timespec_t *ts);
]]
local C = ffi.C

-- ---------------------------------------------------------------------
-- small helpers

local function say(fmt, ...)
	io.stderr:write("bench: ", fmt:format(...), "\n")
	io.stderr:flush()
end

local function read_file(path)
	local f = io.open(path, "rb")
	if not f then return "" end
	local s = f:read("*a")
	f:close()
	return s
end

local function write_file(path, text)
	local f = assert(io.open(path, "wb"))
	f:write(text)
	f:close()
end

local function shell_quote(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function wallclock()
	local ts = ffi.new("bench_timespec_t")
	C.clock_gettime(0, ts) -- CLOCK_REALTIME
	return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

local function median(list)
	if #list == 0 then return nil end
	local s = {}
	for i, v in ipairs(list) do s[i] = v end
	table.sort(s)
	if #s % 2 == 1 then return s[(#s + 1) / 2] end
	return (s[#s / 2] + s[#s / 2 + 1]) / 2
end

local function commas(n)
	local s = string.format("%.0f", n)
	local neg = s:sub(1, 1) == "-"
	if neg then s = s:sub(2) end
	s = s:reverse():gsub("(%d%d%d)", "%1,"):reverse():gsub("^,", "")
	return (neg and "-" or "") .. s
end

-- "key=value key=value" (bench/limit's output) -> table of numbers
local function kv(line)
	local t = {}
	for k, v in line:gmatch("([%w_]+)=(%S+)") do t[k] = tonumber(v) or v end
	return t
end

-- ---------------------------------------------------------------------
-- processes: posix_spawn, reaped with wait4 for exit code and peak RSS

local ROOT
do
	local p = io.popen("pwd")
	ROOT = p:read("*l")
	p:close()
end
local BIN = ROOT .. "/projhost"
local LIMIT = ROOT .. "/bench/limit"

local TMP            -- the throwaway cluster's home and every scratch file
local children = {}  -- pid -> true while running
local env_extra = {} -- added to every child's environment

-- Our environment minus anything that could point a child at another
-- database, plus env_extra and extra (false unsets).
local CLEARED = { PROJHOST_DB = true, PGHOST = true, PGHOSTADDR = true, PGPORT = true, PGDATABASE = true,
	PGUSER = true, PGSERVICE = true, PGPASSWORD = true, PGOPTIONS = true }

local function child_env(extra)
	local env, order = {}, {}
	for _, kv_ in ipairs(proc.environ()) do
		local k = kv_[1]
		if not env[k] and not CLEARED[k] then
			order[#order + 1] = k
			env[k] = kv_[2]
		end
	end
	for _, src in ipairs({ env_extra, extra or {} }) do
		for k, v in pairs(src) do
			if env[k] == nil then order[#order + 1] = k end
			env[k] = v
		end
	end
	local list = {}
	for _, k in ipairs(order) do
		if env[k] then list[#list + 1] = k .. "=" .. tostring(env[k]) end
	end
	return list
end

-- spawn(path, args, opts) -> pid; stdout and stderr both go to opts.log.
local function spawn(path, args, opts)
	opts = opts or {}
	local pid = proc.spawn(path, args, child_env(opts.env), { stdout = opts.log, stderr = opts.log })
	children[pid] = true
	return pid
end

-- Wait until the child exits or timeout seconds pass. Returns exit code
-- (128 + signal if signalled) and peak RSS in KB - on Linux the largest of
-- the child and every descendant it reaped (its workers) - or nil on timeout.
local function wait_child(pid, timeout)
	local code, rss = proc.wait(pid, timeout)
	if code then children[pid] = nil end
	return code, rss
end

local function kill_child(pid)
	if not children[pid] then return end
	core.kill(pid, 15)
	if not wait_child(pid, 10) then
		core.kill(pid, 9)
		wait_child(pid, 10)
	end
end

local seq = 0
local function scratch(name)
	seq = seq + 1
	return ("%s/%02d-%s"):format(TMP, seq, name)
end

-- Run to completion: { code, seconds, rss_kb, out } or { timeout = true, ... }.
local function run(path, args, opts)
	opts = opts or {}
	local log = scratch((opts.name or "run") .. ".log")
	local t0 = core.monotime()
	local pid = spawn(path, args, { log = log, env = opts.env })
	local code, rss = wait_child(pid, opts.timeout or 120)
	local dt = core.monotime() - t0
	if not code then
		core.kill(pid, 9)
		wait_child(pid, 10)
		return { timeout = true, seconds = dt, out = read_file(log), log = log }
	end
	return { code = code, seconds = dt, rss_kb = rss, out = read_file(log), log = log }
end

local function must(r, what)
	if r.timeout then error(what .. ": timed out\n" .. r.out, 0) end
	if r.code ~= 0 then error(("%s: exit code %d\n%s"):format(what, r.code, r.out), 0) end
	return r.out
end

local function tail(text, n)
	local lines = {}
	for l in text:gmatch("[^\n]+") do lines[#lines + 1] = l end
	return table.concat(lines, "\n", math.max(1, #lines - (n or 5) + 1))
end

-- ---------------------------------------------------------------------
-- the cluster

local DSN, admin -- DSN of the main database; a connection to it

local function connect(dsn)
	local c, err = core.connect(dsn)
	if not c then error("connect " .. dsn .. ": " .. tostring(err), 0) end
	return c
end

local function sql(conn, q, ...)
	local rows, err = conn:query(q, ...)
	if not rows then error(("SQL failed: %s\n  %s"):format(err, q), 2) end
	return rows
end

-- DROP DATABASE ... WITH (FORCE) refuses (42501) while an autovacuum
-- worker is in the database (its process has no role the bench's user is
-- a member of); that worker is gone within moments.
local function drop_database(db)
	local q = "DROP DATABASE " .. db .. " WITH (FORCE)"
	for _ = 1, 50 do
		local rows, err, code = admin:query(q)
		if rows then return end
		if code ~= "42501" then error(("SQL failed: %s\n  %s"):format(err, q), 2) end
		core.sleep(0.2)
	end
	sql(admin, q)
end

local function dsn_for(db)
	return (DSN:gsub("dbname=%S+", "dbname=" .. db))
end

local function start_cluster()
	local err
	-- mode 0755: the cluster runs as nobody when we are root
	TMP, err = proc.tmpdir("/tmp/projhost-bench.")
	if not TMP then error(err, 0) end
	env_extra.PROJHOST_HOME = TMP .. "/home"
	local r = run(BIN, { "db", "start" }, { name = "db-start",
		env = { PROJHOST_PG_OPTS = "-c track_commit_timestamp=on" } })
	must(r, "projhost db start")
	DSN = must(run(BIN, { "db", "url" }, { name = "db-url" }), "projhost db url"):match("^%s*(.-)%s*$")
	admin = connect(DSN)
end

local function stop_cluster()
	for pid in pairs(children) do kill_child(pid) end
	if admin then admin:close(); admin = nil end
	if not TMP then return end
	if os.getenv("BENCH_KEEP") == "1" then
		say("BENCH_KEEP=1: the cluster keeps running in %s (DSN %s)", TMP, tostring(DSN))
		return
	end
	local r = run(BIN, { "db", "stop" }, { name = "db-stop", timeout = 90 })
	if r.timeout or r.code ~= 0 then say("projhost db stop failed: %s", tail(r.out)) end
	os.execute("rm -rf " .. shell_quote(TMP))
	TMP = nil
end

-- Schema (projhost status creates it), then events and their streams rows
-- in plain set-based SQL. Stream s of n_streams gets events s, s+n, ...;
-- every third event is a withdrawal.
local function load_events(dsn, n_streams, per_stream)
	must(run(BIN, { "status", "--db", dsn }, { name = "status" }), "projhost status")
	local c = connect(dsn)
	local total = n_streams * per_stream
	local t0 = core.monotime()
	sql(c, ([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
		SELECT 'account-' || (i %% %d + 1), i / %d + 1,
			CASE WHEN i %% 3 = 2 THEN 'Withdrawn' ELSE 'Deposited' END,
			jsonb_build_object('amount', i %% 100 + 1)
		FROM generate_series(0, %d) AS i]]):format(n_streams, n_streams, total - 1))
	sql(c, [[INSERT INTO projhost.streams (stream_id, version, last_position)
		SELECT stream_id, max(stream_version), max(global_position) FROM projhost.events GROUP BY stream_id]])
	sql(c, "VACUUM ANALYZE")
	sql(c, "CHECKPOINT")
	say("loaded %s events over %s streams in %.1f s", commas(total), commas(n_streams), core.monotime() - t0)
	return c
end

local function warm(dsn)
	-- one full read through the same path the limit client measures
	must(run(LIMIT, { "read", dsn }, { name = "warm", timeout = T_LIMIT }), "warming the cache")
end

-- ---------------------------------------------------------------------
-- measurements

local results = { rows = {} }

-- A host catch-up: `projhost run --once` on one projection file.
-- check(conn) -> true | nil, why: did it really process everything?
-- progress(conn) -> events applied (committed) so far, for a timeout.
local function host_catchup(dsn, file, args, timeout, check, conn, progress)
	local argv = { "run", "--once", "--db", dsn }
	for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
	argv[#argv + 1] = ROOT .. "/bench/projections/" .. file
	local r = run(BIN, argv, { name = file:gsub("%.lua$", ""), timeout = timeout })
	if r.timeout then
		local n = progress and progress(conn)
		return { timeout = true, seconds = r.seconds, partial_events_per_s = n and n / r.seconds }
	end
	if r.code ~= 0 then
		return { failed = ("exit code %d: %s"):format(r.code, tail(r.out, 3)) }
	end
	local ok, why = check(conn)
	if not ok then return { failed = why .. "\n" .. tail(r.out, 3) } end
	return { seconds = r.seconds, rss_mb = r.rss_kb / 1024 }
end

-- Run fn(i, timeout) up to RUNS times and take the median of every numeric
-- field. With an allowance (seconds for all runs of the row), each run's
-- timeout is what is left of it, and no run starts that would not fit if
-- it took as long as the slowest so far. Stops at the first timeout or
-- failure (the figure then says so).
local function repeated(label, fn, allowance, max_runs)
	if not wanted(label) then return nil end
	local nmax = math.min(RUNS, max_runs or RUNS)
	local runs, out = {}, {}
	local t0 = core.monotime()
	local slowest = 0
	for i = 1, nmax do
		local left = allowance and allowance - (core.monotime() - t0)
		if left and i > 1 and slowest > left then
			say("%s: %d of %d runs fit in its %d s; reporting those", label, i - 1, nmax, allowance)
			out.cut = true
			break
		end
		local t1 = core.monotime()
		local r = fn(i, left or T_LIMIT)
		slowest = math.max(slowest, core.monotime() - t1)
		runs[#runs + 1] = r
		if r.timeout then
			say("%s run %d/%d: timeout after %.0f s%s", label, i, nmax, r.seconds or 0,
				r.partial_events_per_s and (" (%s ev/s until then)"):format(commas(r.partial_events_per_s)) or "")
			out.timeout = true
			out.partial_events_per_s = r.partial_events_per_s
			break
		elseif r.failed then
			say("%s run %d/%d FAILED: %s", label, i, nmax, r.failed)
			out.failed = r.failed
			break
		end
		local parts = {}
		for k, v in pairs(r) do
			if type(v) == "number" then parts[#parts + 1] = ("%s=%.4g"):format(k, v) end
		end
		table.sort(parts)
		say("%s run %d/%d: %s", label, i, nmax, table.concat(parts, " "))
	end
	out.runs = runs
	out.nruns = #runs
	if not out.timeout and not out.failed then
		local keys = {}
		for k, v in pairs(runs[1]) do if type(v) == "number" then keys[#keys + 1] = k end end
		for _, k in ipairs(keys) do
			local l = {}
			for _, r in ipairs(runs) do l[#l + 1] = r[k] end
			out[k] = median(l)
		end
	end
	results.rows[label] = out
	return out
end

local function limit_mode(mode, dsn, extra, timeout)
	local args = { mode, dsn }
	for _, a in ipairs(extra or {}) do args[#args + 1] = a end
	local r = run(LIMIT, args, { name = "limit-" .. mode, timeout = timeout or T_LIMIT })
	if r.timeout then return { timeout = true, seconds = r.seconds } end
	if r.code ~= 0 then return { failed = tail(r.out, 3) } end
	return kv(r.out)
end

-- rows 1-3 ------------------------------------------------------------

local expected_sum -- of all balances, from the data set itself

local function check_count(conn)
	local rows = sql(conn, [[SELECT (state->>'total')::bigint AS n FROM projhost.checkpoints
		WHERE projection = 'bench_count' AND partition = '']])
	local n = rows[1] and tonumber(rows[1].n)
	if n ~= N_EVENTS then return nil, "bench_count counted " .. tostring(n) .. " events" end
	return true
end

local function check_balances(conn)
	local r = sql(conn, "SELECT count(*) AS n, sum(amount) AS s FROM balances")[1]
	if tonumber(r.n) ~= N_STREAMS or tonumber(r.s) ~= expected_sum then
		return nil, ("balances has %s rows summing to %s, expected %d rows summing to %s")
			:format(r.n, tostring(r.s), N_STREAMS, tostring(expected_sum))
	end
	return true
end

-- events a run of rows 2-3 committed: positions 1..N are all account-*
local function progress_main(conn)
	local r = sql(conn, "SELECT max(last_pos) AS p FROM projhost.checkpoints WHERE partition = ''")[1]
	return tonumber(r.p) or 0
end

-- Between runs: TRUNCATE rather than DELETE, so every run starts from the
-- same physical tables (100,000 deleted checkpoint rows per partitioned run
-- would otherwise pile up and slow the later runs down).
local function reset_main(conn)
	sql(conn, "TRUNCATE projhost.checkpoints, balances")
end

local function catchup_rows(conn)
	-- 1. limit-read
	repeated("limit_read", function(_, timeout)
		local r = limit_mode("read", DSN, nil, timeout)
		if r.rows and r.rows ~= N_EVENTS then r = { failed = "read " .. r.rows .. " rows" } end
		return r.rows_per_s and { rows_per_s = r.rows_per_s, seconds = r.seconds } or r
	end, ALLOW.limit_read)

	-- 2. state only
	repeated("state_only", function(_, timeout)
		reset_main(conn)
		local r = host_catchup(DSN, "count.lua", nil, timeout, check_count, conn, progress_main)
		if r.seconds and not r.timeout then r.events_per_s = N_EVENTS / r.seconds end
		return r
	end, ALLOW.state_only)

	-- 3. read model: per-event statements vs the pipelined C loop, and
	-- ctx:upsert vs one set-based upsert per page. Interleaved, so both
	-- sides of each ratio see the same state of the cluster.
	local function c_loop(mode)
		return function(_, timeout)
			reset_main(conn)
			local r = limit_mode(mode, DSN, nil, timeout)
			if r.events and (r.events ~= N_EVENTS or not check_balances(conn)) then
				local _, why = check_balances(conn)
				return { failed = "bench/limit " .. mode .. ": " .. tostring(why or r.events .. " events") }
			end
			return r.events_per_s and { events_per_s = r.events_per_s, seconds = r.seconds } or r
		end
	end
	local function host(file)
		return function(_, timeout)
			reset_main(conn)
			local r = host_catchup(DSN, file, nil, timeout, check_balances, conn, progress_main)
			if r.seconds and not r.timeout then r.events_per_s = N_EVENTS / r.seconds end
			return r
		end
	end
	repeated("limit_pipeline", c_loop("pipeline"), ALLOW.limit_pipeline)
	repeated("read_model_exec", host("balances_exec.lua"), ALLOW.read_model_exec)
	repeated("limit_setupsert", c_loop("setupsert"), ALLOW.limit_setupsert)
	repeated("read_model_upsert", host("balances_upsert.lua"), ALLOW.read_model_upsert)
	reset_main(conn)
end

-- rows 4 and 10: what a partitioned count (pcount*.lua) must end with
local function pcount_check(projection, n_streams, total)
	local function check(c)
		local r = sql(c, [[SELECT count(*) AS n, sum((state->>'n')::bigint) AS s FROM projhost.checkpoints
			WHERE projection = $1 AND partition <> '']], projection)[1]
		if tonumber(r.n) ~= n_streams or tonumber(r.s) ~= total then
			return nil, ("%s: %s partitions, %s events (expected %d, %d)"):format(
				projection, r.n, tostring(r.s), n_streams, total)
		end
		return true
	end
	local function progress(c)
		local r = sql(c, [[SELECT sum((state->>'n')::bigint) AS s FROM projhost.checkpoints
			WHERE projection = $1 AND partition <> '']], projection)[1]
		return tonumber(r.s) or 0
	end
	return check, progress
end

-- row 4 -----------------------------------------------------------------

local function partitioned_rows()
	if not wanted_any("partitioned") then return end
	local db = "bench_part"
	sql(admin, "CREATE DATABASE " .. db)
	local pdsn = dsn_for(db)
	local conn = load_events(pdsn, P_STREAMS, P_PER_STREAM)
	warm(pdsn)
	local check, progress = pcount_check("bench_pcount", P_STREAMS, P_STREAMS * P_PER_STREAM)
	for _, w in ipairs({ 1, 2 }) do
		repeated("partitioned_w" .. w, function(_, timeout)
			sql(conn, "TRUNCATE projhost.checkpoints")
			local r = host_catchup(pdsn, "pcount.lua", { "--workers", w }, timeout, check, conn, progress)
			if r.seconds and not r.timeout then r.events_per_s = P_STREAMS * P_PER_STREAM / r.seconds end
			return r
		end, ALLOW["partitioned_w" .. w])
	end
	conn:close()
	drop_database(db)
end

-- rows 5 and 7: a live host ------------------------------------------------

-- Start `projhost run` in the background; wait for its log to match.
local function start_host(dsn, paths, env, ready_pattern)
	local log = scratch("host.log")
	local argv = { "run", "--db", dsn }
	for _, p in ipairs(paths) do argv[#argv + 1] = p end
	local pid = spawn(BIN, argv, { log = log, env = env })
	local deadline = core.monotime() + 30
	while not read_file(log):find(ready_pattern) do
		if not children[pid] or wait_child(pid, 0) or core.monotime() > deadline then
			error("the host did not get ready (" .. ready_pattern .. "):\n" .. tail(read_file(log), 10), 0)
		end
		core.sleep(0.02)
	end
	return pid, log
end

-- Row 5's measurement: limit write appends LIVE_RATE events/s for seconds
-- into category "lat" while the host on latency.lua runs; every event must
-- be applied, then the commit-time differences give the percentiles.
local function measure_live(conn, ldsn, seconds)
	local before = tonumber(sql(conn, "SELECT coalesce(max(global_position), 0) AS p FROM projhost.events")[1].p)
	local w = limit_mode("write", ldsn, { LIVE_RATE, seconds, "lat" }, seconds + 30)
	if not w.events then return w end
	-- every event applied? (allow a few seconds for a backlog)
	local deadline = core.monotime() + 30
	local n
	repeat
		n = tonumber(sql(conn, "SELECT count(*) AS n FROM latency WHERE position > $1", before)[1].n)
		if n >= w.events then break end
		core.sleep(0.05)
	until core.monotime() > deadline
	if n < w.events then return { timeout = true, seconds = 30 } end
	local r = sql(conn, [[SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
			percentile_disc(0.99) WITHIN GROUP (ORDER BY ms) AS p99, max(ms) AS max, count(*) AS n
		FROM (SELECT extract(epoch FROM pg_xact_commit_timestamp(l.xmin)
				- pg_xact_commit_timestamp(e.xmin)) * 1000 AS ms
			FROM latency l JOIN projhost.events e ON e.global_position = l.position
			WHERE l.position > $1) t]], before)[1]
	return { p50_ms = tonumber(r.p50), p99_ms = tonumber(r.p99), max_ms = tonumber(r.max),
		events = tonumber(r.n), writer_events_per_s = w.events_per_s }
end

local function latency_row()
	local db = "bench_live"
	sql(admin, "CREATE DATABASE " .. db)
	local ldsn = dsn_for(db)
	must(run(BIN, { "status", "--db", ldsn }, { name = "status" }), "projhost status")
	if not wanted_any("live") then return ldsn end
	local conn = connect(ldsn)
	local pid = start_host(ldsn, { ROOT .. "/bench/projections/latency.lua" }, nil, "bench_latency pos=0 caught up")

	repeated("notify", function()
		local r = limit_mode("notify", ldsn, { NOTIFY_N })
		return r.p50_ms and { p50_ms = r.p50_ms, p99_ms = r.p99_ms, max_ms = r.max_ms } or r
	end)
	repeated("live", function()
		return measure_live(conn, ldsn, LIVE_SECONDS)
	end)
	kill_child(pid)
	conn:close()
	return ldsn
end

-- issue 13 on a live host serving HTTP (run --http): projhost.wait_for
-- right after an append's commit until the batch applying it committed
-- (OPS_WAITS appends, one at a time), and GET /metrics (OPS_SCRAPES
-- requests, by curl: its time_total)
local OPS_WAITS, OPS_SCRAPES = 200, 50
local function ops_rows(ldsn)
	if not (wanted("wait_for") or wanted("metrics")) then return end
	local conn = connect(ldsn)
	local log = scratch("ops-host.log")
	local pid = spawn(BIN, { "run", "--db", ldsn, "--http", "127.0.0.1:0", ROOT .. "/bench/projections/latency.lua" },
		{ log = log })
	local addr
	local deadline = core.monotime() + 30
	repeat
		addr = read_file(log):match("serving HTTP on http://(127%.0%.0%.1:%d+)/")
		if addr and read_file(log):find("bench_latency pos=%d+ caught up") then break end
		addr = nil
		if not children[pid] or wait_child(pid, 0) or core.monotime() > deadline then
			error("the ops host did not get ready:\n" .. tail(read_file(log), 10), 0)
		end
		core.sleep(0.02)
	until false
	if wanted("wait_for") then
		local t = {}
		for i = 1, OPS_WAITS do
			local v = tonumber(sql(conn, "SELECT projhost.append('lat-ops', NULL, '[{\"type\":\"Tick\"}]') AS v")[1].v)
			local t0 = wallclock()
			local ok = sql(conn, "SELECT projhost.wait_for('bench_latency', 'lat-ops', $1, 5000) AS ok", v)[1].ok
			if ok ~= "t" then error("wait_for timed out at lat-ops@" .. v, 0) end
			t[i] = (wallclock() - t0) * 1000
		end
		table.sort(t)
		results.rows.wait_for = { p50_ms = t[math.ceil(#t * 0.5)], p99_ms = t[math.ceil(#t * 0.99)],
			max_ms = t[#t], nruns = 1, waits = #t }
	end
	if wanted("metrics") then
		local t = {}
		for i = 1, OPS_SCRAPES do
			local r = run("/usr/bin/curl", { "-sS", "-o", "/dev/null", "-w", "%{time_total}\n",
				"http://" .. addr .. "/metrics" }, { name = "curl" })
			t[i] = tonumber(must(r, "curl /metrics"):match("([%d%.]+)%s*$")) * 1000
		end
		table.sort(t)
		results.rows.metrics = { p50_ms = t[math.ceil(#t * 0.5)], p99_ms = t[math.ceil(#t * 0.99)],
			max_ms = t[#t], nruns = 1, scrapes = #t }
	end
	kill_child(pid)
	conn:close()
end

-- "2026-11-22T22:54:32.883Z" -> seconds since the epoch
local function iso_to_epoch(y, mo, d, h, mi, s, ms)
	y, mo = tonumber(y), tonumber(mo)
	if mo <= 2 then y = y - 1 end
	local era = math.floor(y / 400)
	local yoe = y - era * 400
	local mp = (mo + 9) % 12
	local doy = math.floor((153 * mp + 2) / 5) + tonumber(d) - 1
	local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
	local days = era * 146097 + doe - 719468
	return days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s) + tonumber(ms) / 1000
end

local RELOAD_SRC = [[
-- bench/bench.lua rewrites this file to time hot reload (variant %d)
return {
	name = "bench_reload",
	from = { stream = "reload-1" },
	init = function() return { n = 0 } end,
	when = {
		["*"] = function(s)
			s.n = s.n + %d
		end,
	},
}
]]

local function reload_row(dsn)
	if not wanted("reload") then return end
	local dir = TMP .. "/reload"
	os.execute("mkdir -p " .. shell_quote(dir))
	local file = dir .. "/reload.lua"
	write_file(file, RELOAD_SRC:format(0, 1))
	local pid, log = start_host(dsn, { dir }, { PROJHOST_POLL_INTERVAL = "600" }, "bench_reload pos=0 caught up")
	local PAT = "(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)%.(%d+)Z [^\n]*reloaded %(hash"
	local function count()
		local n = 0
		for _ in read_file(log):gmatch("reloaded %(hash") do n = n + 1 end
		return n
	end
	repeated("reload", function(i)
		core.sleep(0.5) -- let the previous reload settle
		local seen = count()
		local tmp = file .. ".tmp"
		write_file(tmp, RELOAD_SRC:format(i, i + 1))
		local t0 = wallclock()
		assert(os.rename(tmp, file))
		local deadline = core.monotime() + 10
		while count() <= seen do
			if core.monotime() > deadline then return { timeout = true, seconds = 10 } end
			core.sleep(0.002)
		end
		local k, ts = 0, nil
		for y, mo, d, h, mi, s, ms in read_file(log):gmatch(PAT) do
			k = k + 1
			if k == seen + 1 then ts = iso_to_epoch(y, mo, d, h, mi, s, ms) end
		end
		if not ts then return { failed = "no timestamp on the reload line" } end
		return { ms = (ts - t0) * 1000 }
	end)
	kill_child(pid)
end

-- ---------------------------------------------------------------------
-- rows 8-12 (issue 11): reads and appends at scale

-- Events of the mixed store, one generate_series index i each: of every
-- hundred, 10 are of category "ten" (10,000 streams), 1 of "one" (1,000
-- streams), 45 of "deep" (DEEP_STREAMS: 100,000) - one of them "Rare" (1%
-- of the store), the others "Noise" - and 44 of "wide" (WIDE_STREAMS:
-- 1,000,000; "Noise"). j numbers the events within their category, so a
-- stream's versions are dense in the whole store and every event's stream,
-- version, type and data are the same wherever it is loaded. Ids are
-- sequential (uuid from i): random ones make the load a third slower.
local MIX_SQL = [[
INSERT INTO projhost.events (event_id, stream_id, stream_version, event_type, data)
SELECT lpad(to_hex(i), 32, '0')::uuid, m.cat || '-' || (m.j %% m.n), m.j / m.n + 1,
	CASE WHEN m.k = 11 THEN 'Rare' WHEN m.k > 10 THEN 'Noise'
		WHEN m.j %% 3 = 2 THEN 'Withdrawn' ELSE 'Deposited' END,
	jsonb_build_object('amount', m.j %% 100 + 1)
FROM generate_series(0, %d) AS i,
	LATERAL (SELECT i %% 100 AS k) AS kk,
	LATERAL (SELECT kk.k,
		CASE WHEN kk.k < 10 THEN 'ten' WHEN kk.k = 10 THEN 'one' WHEN kk.k < 56 THEN 'deep' ELSE 'wide' END AS cat,
		CASE WHEN kk.k < 10 THEN i / 100 * 10 + kk.k
			WHEN kk.k = 10 THEN i / 100
			WHEN kk.k < 56 THEN i / 100 * 45 + kk.k - 11
			ELSE i / 100 * 44 + kk.k - 56 END AS j,
		CASE WHEN kk.k < 10 THEN 10000 WHEN kk.k = 10 THEN 1000 WHEN kk.k < 56 THEN %d ELSE %d END AS n) AS m
WHERE %s]]

-- the three shares of rows 8: projection file, its table, which events of
-- the mix (a WHERE on i), the share's name in the table, at most how many
-- runs (the 10% share takes 5-10 s a run)
local SHARES = {
	{ label = "share10", file = "share10.lua", table = "share10", where = "i % 100 < 10",
		what = "category 10% of it", runs = 1 },
	{ label = "share1", file = "share1.lua", table = "share1", where = "i % 100 = 10", what = "category 1% of it" },
	{ label = "types1", file = "types1.lua", table = "types1", where = "i % 100 = 11",
		what = "types 1% of it (category 45%)" },
}

-- Mixed events (those of `where`) into a database of their own; the
-- streams rows as load_events makes them. analyze: VACUUM ANALYZE as
-- load_events does; without it nothing reads statistics into the tables
-- and autovacuum is off for them (until the database is dropped), so they
-- stay as a bulk import leaves them.
local function load_mix(dsn, where, analyze)
	must(run(BIN, { "status", "--db", dsn }, { name = "status" }), "projhost status")
	local c = connect(dsn)
	local t0 = core.monotime()
	if not analyze then
		sql(c, [[ALTER TABLE projhost.events SET (autovacuum_enabled = off, toast.autovacuum_enabled = off)]])
		sql(c, [[ALTER TABLE projhost.streams SET (autovacuum_enabled = off, toast.autovacuum_enabled = off)]])
	end
	-- conn:exec returns the row count: nothing reads the new events yet
	local n, err = c:exec(MIX_SQL:format(STORE_N - 1, DEEP_STREAMS, WIDE_STREAMS, where))
	if not n then error("loading the mixed store: " .. tostring(err), 0) end
	n = tonumber(n)
	-- in key order: 1,100,000 rows go in in 7 s instead of 12
	sql(c, [[INSERT INTO projhost.streams (stream_id, version, last_position)
		SELECT stream_id, max(stream_version), max(global_position) FROM projhost.events GROUP BY stream_id
		ORDER BY stream_id]])
	if analyze then sql(c, "VACUUM ANALYZE") end
	sql(c, "CHECKPOINT")
	say("loaded %s events (%s) in %.1f s%s", commas(n), where, core.monotime() - t0,
		analyze and "" or ", no ANALYZE, autovacuum off")
	return c, n
end

-- what a share's projection must end with: rows (streams) and their sum
local function share_expect(c)
	local r = sql(c, [[SELECT count(DISTINCT stream_id) AS n,
		sum(CASE event_type WHEN 'Withdrawn' THEN -1 ELSE 1 END * (data->>'amount')::bigint) AS s
		FROM projhost.events]])[1]
	return { rows = tonumber(r.n), sum = tonumber(r.s) }
end

local function check_share(share, expect)
	return function(c)
		local r = sql(c, ("SELECT count(*) AS n, sum(amount) AS s FROM %s"):format(share.table))[1]
		if tonumber(r.n) ~= expect.rows or tonumber(r.s) ~= expect.sum then
			return nil, ("%s has %s rows summing to %s, expected %d rows summing to %s"):format(
				share.table, r.n, tostring(r.s), expect.rows, tostring(expect.sum))
		end
		return true
	end
end

-- events a projection committed so far: those of its source up to its
-- checkpoint (only read on a timeout)
local function progress_of(name, where_sql)
	return function(c)
		local r = sql(c, ([[SELECT count(*) AS n FROM projhost.events
			WHERE global_position <= (SELECT last_pos FROM projhost.checkpoints
				WHERE projection = $1 AND partition = '') AND %s]]):format(where_sql), name)[1]
		return tonumber(r.n) or 0
	end
end

-- After a timeout: a killed client's backend runs its query on to the end,
-- which would slow the rows after it down. Ends every other session of c's
-- database (the bench cluster's own).
local function end_backends(c)
	sql(c, [[SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend']])
end

local function forget(c, projection, tbl)
	sql(c, "DELETE FROM projhost.checkpoints WHERE projection = $1", projection)
	if tbl then sql(c, ("DROP TABLE IF EXISTS %s"):format(tbl)) end
end

-- a catch-up row: events_per_s = events / wall time of `run --once`
local function catchup_row(label, dsn, c, file, projection, tbl, n_events, check, progress, allowance, max_runs)
	return repeated(label, function(_, timeout)
		forget(c, projection, tbl)
		local r = host_catchup(dsn, file, nil, timeout, check, c, progress)
		if r.timeout then end_backends(c) end
		if r.seconds and not r.timeout then r.events_per_s = n_events / r.seconds end
		return r
	end, allowance, max_runs)
end

local SHARE_WHERE = {
	share10 = "split_part(stream_id, '-', 1) = 'ten'",
	share1 = "split_part(stream_id, '-', 1) = 'one'",
	types1 = "event_type = 'Rare'",
}

local notes = {} -- lines printed under the table (e.g. why a figure is missing)

-- pgbench: PGBENCH_CLIENTS clients calling script for `seconds`; checks
-- that every transaction it counts appended the same number of events and
-- that the streams rows account for every one of them.
local function pgbench(dsn, c, script, seconds)
	local before = sql(c, [[SELECT (SELECT coalesce(max(global_position), 0) FROM projhost.events) AS p,
		(SELECT coalesce(sum(version), 0) FROM projhost.streams) AS v]])[1]
	local r = run("/usr/bin/pgbench", { "-n", "-c", tostring(PGBENCH_CLIENTS), "-j", "2",
		"-T", tostring(seconds), "-f", script, dsn }, { name = "pgbench", timeout = seconds + 60 })
	if r.timeout then
		end_backends(c)
		return { timeout = true, seconds = r.seconds }
	end
	if r.code ~= 0 then return { failed = "pgbench: exit code " .. r.code .. ": " .. tail(r.out, 3) } end
	local tps = tonumber(r.out:match("tps = ([%d%.]+) %(without initial connection time%)"))
	local n_tx = tonumber(r.out:match("number of transactions actually processed: (%d+)"))
	local n_failed = tonumber(r.out:match("number of failed transactions: (%d+)") or "0")
	if not tps or not n_tx or n_tx == 0 then return { failed = "pgbench said: " .. tail(r.out, 5) } end
	if n_failed ~= 0 then return { failed = ("pgbench: %d failed transactions"):format(n_failed) } end
	local after = sql(c, [[SELECT (SELECT count(*) FROM projhost.events WHERE global_position > $1) AS n,
		(SELECT coalesce(sum(version), 0) FROM projhost.streams) AS v]], before.p)[1]
	local n_ev, dv = tonumber(after.n), tonumber(after.v) - tonumber(before.v)
	if n_ev < n_tx or n_ev % n_tx ~= 0 or dv ~= n_ev then
		return { failed = ("pgbench counted %d transactions; %d new events, stream versions up by %d")
			:format(n_tx, n_ev, dv) }
	end
	return { appends_per_s = tps, events_per_s = n_ev / seconds, transactions = n_tx }
end

-- The pgbench script: bench/append.sql, or one append of one event to one
-- of 100,000 streams.
local function append_script()
	local text = read_file(ROOT .. "/bench/append.sql")
	local from = "bench/append.sql"
	if not text:match("%S") then
		text = [[SELECT projhost.append('bench-' || (random()*100000)::int, NULL, '[{"type":"t","data":{"n":1}}]');]] .. "\n"
		from = "built-in script"
	end
	local plain = scratch("append.sql")
	write_file(plain, text)
	return plain, from
end

-- Rows measured in turns (A B A B ...), n runs each, each figure the
-- median of its row's runs; a row stops at its first timeout or failure.
local function in_turns(list, n)
	local rows = {}
	for i = 1, n do
		for _, it in ipairs(list) do
			local label, fn = it[1], it[2]
			local out = rows[label]
			if wanted(label) and not (out and (out.timeout or out.failed)) then
				out = out or { runs = {} }
				rows[label] = out
				local r = fn()
				out.runs[#out.runs + 1] = r
				if r.timeout then
					out.timeout = true
					say("%s run %d/%d: timeout", label, i, n)
				elseif r.failed then
					out.failed = r.failed
					say("%s run %d/%d FAILED: %s", label, i, n, r.failed)
				else
					local parts = {}
					for k, v in pairs(r) do
						if type(v) == "number" then parts[#parts + 1] = ("%s=%.4g"):format(k, v) end
					end
					table.sort(parts)
					say("%s run %d/%d: %s", label, i, n, table.concat(parts, " "))
				end
			end
		end
	end
	for label, out in pairs(rows) do
		out.nruns = #out.runs
		if not out.timeout and not out.failed then
			for k, v in pairs(out.runs[1]) do
				if type(v) == "number" then
					local l = {}
					for _, r in ipairs(out.runs) do l[#l + 1] = r[k] end
					out[k] = median(l)
				end
			end
		end
		results.rows[label] = out
	end
end

-- rows 11: appends/s of pgbench, with and without NOTIFY, on c's store.
-- Without NOTIFY: the same appends with projhost's wake trigger (which
-- sends them, see "One NOTIFY per moment" in projhost.schema) disabled.
local function append_rows(label, dsn, c, reset)
	if not (wanted(label) or wanted(label .. "_nonotify")) then return end
	local script, from = append_script()
	results.append_script = from
	local function quiet(on)
		sql(c, "ALTER TABLE projhost.streams " .. (on and "DISABLE" or "ENABLE") .. " TRIGGER USER")
	end
	-- Both rows start alike: the rows before them leave WAL to checkpoint,
	-- and a new cluster has no WAL segments to recycle yet. The first run
	-- (always the NOTIFY row) paid for that: BENCH_ONLY=append_empty at
	-- af8a614 measured 2,047 then 2,860 appends/s with NOTIFY, 3,026 and
	-- 2,902 without. So one unmeasured run first and a CHECKPOINT before
	-- each run. Runs of one row still differ by up to 40% (commits wait
	-- for the disk, whose latency drifts): five short runs each, in turns,
	-- and their medians.
	local function fresh()
		if reset then reset(c) end
		sql(c, "CHECKPOINT")
	end
	fresh()
	pgbench(dsn, c, script, 2)
	in_turns({ { label, function()
		fresh()
		return pgbench(dsn, c, script, PGBENCH_SECONDS)
	end }, { label .. "_nonotify", function()
		fresh()
		quiet(true)
		local ok, r = pcall(pgbench, dsn, c, script, PGBENCH_SECONDS)
		quiet(false)
		if not ok then error(r, 0) end
		return r
	end } }, 5)
end

-- row 10: a partitioned catch-up of category cat of the store (file
-- pcount_<cat>.lua); what it must count comes from the streams rows
local function pcount_row(label, dsn, c, cat)
	if not wanted(label) then return end
	local e = sql(c, [[SELECT count(*) AS n, sum(version) AS v FROM projhost.streams
		WHERE stream_id LIKE $1 || '-%']], cat)[1]
	local n_streams, total = tonumber(e.n), tonumber(e.v)
	local projection = "bench_p" .. cat
	local check, progress = pcount_check(projection, n_streams, total)
	repeated(label, function(_, timeout)
		-- (vacuumed: a second run's INSERTs would otherwise check every
		-- key against the dead rows of the first)
		sql(c, "DELETE FROM projhost.checkpoints WHERE projection = $1", projection)
		sql(c, "VACUUM projhost.checkpoints")
		local r = host_catchup(dsn, "pcount_" .. cat .. ".lua", { "--workers", 1 }, timeout, check, c, progress)
		if r.timeout then end_backends(c) end
		if r.seconds and not r.timeout then r.events_per_s = total / r.seconds end
		return r
	end, ALLOW_NEW[label], 2)
	if results.rows[label] then
		results.rows[label].streams, results.rows[label].events = n_streams, total
	end
end

-- issue 13: `projhost status` (every projection) and `status NAME` of the
-- partitioned one over the store's WIDE_STREAMS streams, each the median of
-- three runs (the target: under a second with 1,000,000 partitions); the
-- partitions are row 10's (BENCH_ONLY=partitioned_wide,status_1m)
local function status_row(dsn, c)
	if not wanted("status_1m") then return end
	if not results.rows.partitioned_wide then
		results.rows.status_1m = { failed = "needs row partitioned_wide (its partitions)" }
		return
	end
	local function median_of(args)
		local t = {}
		for i = 1, 3 do
			local r = run(BIN, args, { name = "status" })
			must(r, "projhost " .. table.concat(args, " "))
			t[i] = r.seconds
		end
		return median(t)
	end
	results.rows.status_1m = {
		status_s = median_of({ "status", "--db", dsn }),
		status_name_s = median_of({ "status", "bench_pwide", "--limit", "20", "--db", dsn }),
		partitions = tonumber(sql(c, [[SELECT count(*) AS n FROM projhost.checkpoints
			WHERE projection = 'bench_pwide']])[1].n),
		streams = tonumber(sql(c, "SELECT count(*) AS n FROM projhost.streams")[1].n),
		nruns = 3,
	}
end

-- issue 13: `status NAME --behind` with BEHIND_STREAMS of the store's
-- WIDE_STREAMS partitions behind, `--limit 20` and without (the default
-- limit), each the median of three runs. Every wide stream gets a
-- checkpoint at its version first (row 10's partitions, completed with SQL
-- where its timeout cut it; without row 10 a `run --once` then sets the
-- projection up and finds nothing behind), then one event is appended to
-- BEHIND_STREAMS of them, spread over the keys.
local BEHIND_STREAMS = 100
local function status_behind_row(dsn, c)
	if not wanted("status_behind_1m") then return end
	local ok, err = pcall(function()
		sql(c, [[INSERT INTO projhost.checkpoints (projection, partition, version, last_pos)
			SELECT 'bench_pwide', stream_id, 1, version FROM projhost.streams WHERE stream_id LIKE 'wide-%'
			ORDER BY stream_id ON CONFLICT (projection, partition) DO NOTHING]])
		sql(c, [[UPDATE projhost.checkpoints p SET last_pos = st.version FROM projhost.streams st
			WHERE p.projection = 'bench_pwide' AND p.partition = st.stream_id AND p.last_pos <> st.version]])
		sql(c, "VACUUM ANALYZE projhost.checkpoints")
		if #sql(c, "SELECT 1 FROM projhost.sources WHERE projection = 'bench_pwide'") == 0 then
			must(run(BIN, { "run", "--once", "--db", dsn, ROOT .. "/bench/projections/pcount_wide.lua" },
				{ name = "pcount_wide-setup", timeout = 120 }), "run --once pcount_wide.lua")
		end
		sql(c, [[SELECT count(projhost.append('wide-' || (k * ($1::int / $2::int)), NULL, '[{"type":"Noise"}]'))
			FROM generate_series(0, $2::int - 1) k]], WIDE_STREAMS, BEHIND_STREAMS)
	end)
	if not ok then
		results.rows.status_behind_1m = { failed = tostring(err) }
		return
	end
	local function median_of(args)
		local t = {}
		for i = 1, 3 do
			local r = run(BIN, args, { name = "status-behind" })
			local out = must(r, "projhost " .. table.concat(args, " "))
			-- the first 20 of the 100 (a partition line each)
			local _, listed = out:gsub("\nwide%-%d+%s+%d+%s", "")
			if listed ~= 20 or not out:find("(first 20 shown", 1, true) then
				error(("projhost %s listed %d partitions:\n%s"):format(table.concat(args, " "), listed, tail(out, 25)), 0)
			end
			t[i] = r.seconds
		end
		return median(t)
	end
	ok, err = pcall(function()
		results.rows.status_behind_1m = {
			limit_s = median_of({ "status", "bench_pwide", "--behind", "--limit", "20", "--db", dsn }),
			default_s = median_of({ "status", "bench_pwide", "--behind", "--db", dsn }),
			partitions = tonumber(sql(c, [[SELECT count(*) AS n FROM projhost.checkpoints
				WHERE projection = 'bench_pwide' AND partition <> '']])[1].n),
			behind = BEHIND_STREAMS,
			nruns = 3,
		}
	end)
	if not ok then results.rows.status_behind_1m = { failed = tostring(err) } end
end

-- rows 8-11 on the store of STORE_N events
local function store_rows()
	if not (wanted_any("store") or wanted_any("streams") or wanted("append_store")
		or wanted("append_store_nonotify") or wanted("status_1m") or wanted("status_behind_1m")) then return end
	-- the store of their own first: each share's events alone, analyzed
	local own = {}
	for _, sh in ipairs(SHARES) do
		if wanted(sh.label) or wanted(sh.label .. "_own") then
			local db = "bench_own_" .. sh.label
			sql(admin, "CREATE DATABASE " .. db)
			local odsn = dsn_for(db)
			local c, n = load_mix(odsn, sh.where, true)
			own[sh.label] = { dsn = odsn, conn = c, n = n, expect = share_expect(c), db = db }
		end
	end
	local db = "bench_store"
	sql(admin, "CREATE DATABASE " .. db)
	local sdsn = dsn_for(db)
	local c = load_mix(sdsn, "true", false)

	-- 8. { all = true } state only, just loaded, then analyzed
	local function check_all(conn)
		local rows = sql(conn, [[SELECT (state->>'total')::bigint AS n FROM projhost.checkpoints
			WHERE projection = 'bench_count' AND partition = '']])
		local n = rows[1] and tonumber(rows[1].n)
		if n ~= STORE_N then return nil, "bench_count counted " .. tostring(n) .. " events" end
		return true
	end
	local function stats(conn)
		return tonumber(sql(conn, [[SELECT count(*) AS n FROM pg_stats
			WHERE schemaname = 'projhost' AND tablename IN ('events', 'streams')]])[1].n)
	end
	if stats(c) > 0 then
		results.rows.store_all_cold = wanted("store_all_cold") and { failed = "the store has statistics already" } or nil
	else
		catchup_row("store_all_cold", sdsn, c, "count.lua", "bench_count", nil, STORE_N, check_all,
			progress_of("bench_count", "true"), ALLOW_NEW.store_all_cold, 1)
		if stats(c) > 0 then
			notes.cold = "row 8: projhost.events or projhost.streams had statistics after the no-ANALYZE run"
		end
	end
	local t0 = core.monotime()
	sql(c, "ANALYZE projhost.events")
	sql(c, "ANALYZE projhost.streams")
	say("ANALYZE in %.1f s", core.monotime() - t0)
	catchup_row("store_all", sdsn, c, "count.lua", "bench_count", nil, STORE_N, check_all,
		progress_of("bench_count", "true"), ALLOW_NEW.store_all, 1)

	-- 8. each share in the store and in a store of its own
	for _, sh in ipairs(SHARES) do
		local o = own[sh.label]
		if o then
			local projection = "bench_" .. sh.label
			catchup_row(sh.label .. "_own", o.dsn, o.conn, sh.file, projection, sh.table, o.n,
				check_share(sh, o.expect), progress_of(projection, "true"), ALLOW_NEW[sh.label .. "_own"], sh.runs)
			catchup_row(sh.label, sdsn, c, sh.file, projection, sh.table, o.n,
				check_share(sh, o.expect), progress_of(projection, SHARE_WHERE[sh.label]), ALLOW_NEW[sh.label],
				sh.runs)
			o.conn:close()
			drop_database(o.db)
		end
	end

	-- 10. partitioned: the same number of events over 10x the streams
	pcount_row("partitioned_deep", sdsn, c, "deep")
	pcount_row("partitioned_wide", sdsn, c, "wide")
	status_row(sdsn, c)
	status_behind_row(sdsn, c)

	-- 9. live latency with the store's events all projected: latency.lua's
	-- checkpoint is set to the store's last event before the host starts
	-- (as if it had projected all of them; it has no events of its own)
	if wanted("store_live") then
		forget(c, "bench_latency", "latency")
		sql(c, [[INSERT INTO projhost.checkpoints (projection, partition, last_tx, last_pos)
			SELECT 'bench_latency', '', transaction_id, global_position FROM projhost.events
			ORDER BY transaction_id DESC, global_position DESC LIMIT 1]])
		local ok, pid = pcall(start_host, sdsn, { ROOT .. "/bench/projections/latency.lua" }, nil,
			"bench_latency pos=%d+ caught up")
		if ok then
			repeated("store_live", function()
				return measure_live(c, sdsn, STORE_LIVE_SECONDS)
			end, nil, 1)
			kill_child(pid)
		else
			say("store_live: %s", tostring(pid))
			results.rows.store_live = { failed = tostring(pid) }
		end
	end

	-- 11. concurrent appends onto the store (last: they add events)
	append_rows("append_store", sdsn, c)
	c:close()
	drop_database(db)
end

-- row 11 on an empty store (emptied again before each run)
local function append_empty_rows()
	if not (wanted("append_empty") or wanted("append_empty_nonotify")) then return end
	local db = "bench_append"
	sql(admin, "CREATE DATABASE " .. db)
	local adsn = dsn_for(db)
	must(run(BIN, { "status", "--db", adsn }, { name = "status" }), "projhost status")
	local c = connect(adsn)
	append_rows("append_empty", adsn, c, function(conn) sql(conn, "TRUNCATE projhost.events, projhost.streams") end)
	c:close()
	drop_database(db)
end

-- row 12: `projhost append --file` of n lines into an emptied store
local function file_rows()
	if not (wanted("file_small") or wanted("file_large")) then return end
	local db = "bench_file"
	sql(admin, "CREATE DATABASE " .. db)
	local fdsn = dsn_for(db)
	must(run(BIN, { "status", "--db", fdsn }, { name = "status" }), "projhost status")
	local c = connect(fdsn)
	for i, label in ipairs({ "file_small", "file_large" }) do
		local n = FILE_LINES[i]
		if wanted(label) then
			local path = scratch(label .. ".ndjson")
			local f = assert(io.open(path, "wb"))
			local buf = {}
			for k = 0, n - 1 do
				buf[#buf + 1] = ('{"stream":"imp-%d","type":"Imported","data":{"n":%d}}\n'):format(k % FILE_STREAMS, k)
				if #buf == 10000 then
					f:write(table.concat(buf))
					buf = {}
				end
			end
			f:write(table.concat(buf))
			f:close()
			local streams = math.min(n, FILE_STREAMS)
			repeated(label, function(_, timeout)
				sql(c, "TRUNCATE projhost.events, projhost.streams")
				sql(c, "CHECKPOINT")
				local r = run(BIN, { "append", "--db", fdsn, "--file", path }, { name = "append-file", timeout = timeout })
				if r.timeout then
					end_backends(c)
					return { timeout = true, seconds = r.seconds }
				end
				if r.code ~= 0 then return { failed = ("exit code %d: %s"):format(r.code, tail(r.out, 3)) } end
				local q = sql(c, [[SELECT (SELECT count(*) FROM projhost.events) AS n,
					(SELECT sum((data->>'n')::bigint) FROM projhost.events) AS s,
					(SELECT count(*) FROM projhost.streams) AS ns, (SELECT sum(version) FROM projhost.streams) AS v]])[1]
				if tonumber(q.n) ~= n or tonumber(q.s) ~= n * (n - 1) / 2 or tonumber(q.ns) ~= streams
					or tonumber(q.v) ~= n then
					return { failed = ("%s events summing to %s, %s streams of %s versions; expected %d lines")
						:format(q.n, tostring(q.s), q.ns, tostring(q.v), n) }
				end
				return { events_per_s = n / r.seconds, seconds = r.seconds }
			end, ALLOW_NEW[label], 1)
			os.remove(path)
		end
	end
	c:close()
	drop_database(db)
end

-- ---------------------------------------------------------------------
-- the table

-- the 1-minute load average: anything else running on the machine shows
local function loadavg()
	return read_file("/proc/loadavg"):match("^(%S+)") or "?"
end

local function machine()
	local p = io.popen("nproc")
	local cores = tonumber(p:read("*l"))
	p:close()
	local cpuinfo = read_file("/proc/cpuinfo")
	local model = cpuinfo:match("model name%s*:%s*([^\n]+)") or "unknown CPU"
	local mem = tonumber(read_file("/proc/meminfo"):match("MemTotal:%s*(%d+)")) or 0
	local v = sql(admin, "SELECT version() AS v")[1].v
	return { cores = cores, cpu = model, mem_gb = mem / 1024 / 1024, postgres = v,
		postgres_short = v:match("^(.-), compiled") or v }
end

local function fig(row, field, fmt)
	local r = results.rows[row]
	if not r then return "n/a" end
	if r.timeout then
		if r.partial_events_per_s then return ("timeout (%s ev/s)"):format(commas(r.partial_events_per_s)) end
		return "timeout"
	end
	if r.failed then return "failed" end
	if r[field] == nil then return "n/a" end
	return fmt(r[field])
end

local function num(row, field)
	local r = results.rows[row]
	return r and not r.timeout and not r.failed and r[field] or nil
end

local function verdict(ok)
	if ok == nil then return "n/a" end
	return ok and "PASS" or "MISS"
end

-- how many runs the figures of a line come from: "3", or "1/3" (projhost/limit)
local function nruns(a, b)
	local ra, rb = results.rows[a], b and results.rows[b]
	local na, nb = ra and ra.nruns or 0, rb and rb.nruns
	if nb and nb ~= na then return na .. "/" .. nb end
	return tostring(na)
end

local function report(m)
	local ev = function(v) return commas(v) .. " ev/s" end
	local ms = function(v) return ("%.2f ms"):format(v) end
	local mb = function(v) return ("%.1f MB"):format(v) end
	local lines = {}
	local function row(...)
		lines[#lines + 1] = { ... }
	end
	local function ratio(a, b)
		if not a or not b then return nil end
		return a / b
	end
	local function pct_s(x) return x and ("%.0f%%"):format(x * 100) or "-" end

	local read = num("limit_read", "rows_per_s")
	local so = num("state_only", "events_per_s")
	local r_so = ratio(so, read)
	row("1 limit-read", "", fig("limit_read", "rows_per_s", function(v) return commas(v) .. " rows/s" end),
		"", "", "", nruns("limit_read"))
	row("2 catch-up, state only", fig("state_only", "events_per_s", ev), "limit-read", pct_s(r_so),
		">= 50% of limit-read", verdict(r_so and r_so >= 0.5), nruns("state_only", "limit_read"))

	local pipe, exec = num("limit_pipeline", "events_per_s"), num("read_model_exec", "events_per_s")
	local r_ex = ratio(exec, pipe)
	row("3 catch-up, read model, ctx:exec", fig("read_model_exec", "events_per_s", ev),
		"C pipelined " .. fig("limit_pipeline", "events_per_s", ev), pct_s(r_ex),
		">= 90% of C pipelined", verdict(r_ex and r_ex >= 0.9), nruns("read_model_exec", "limit_pipeline"))
	local setu, ups = num("limit_setupsert", "events_per_s"), num("read_model_upsert", "events_per_s")
	row("  catch-up, read model, ctx:upsert", fig("read_model_upsert", "events_per_s", ev),
		"C set upsert " .. fig("limit_setupsert", "events_per_s", ev), pct_s(ratio(ups, setu)),
		">= 120,000 ev/s", verdict(ups and ups >= 120000), nruns("read_model_upsert", "limit_setupsert"))

	local w1, w2 = num("partitioned_w1", "events_per_s"), num("partitioned_w2", "events_per_s")
	local scale = w1 and w2 and w2 / w1
	row("4 catch-up, partitioned, 1 worker", fig("partitioned_w1", "events_per_s", ev), "", "", "", "",
		nruns("partitioned_w1"))
	row("  catch-up, partitioned, 2 workers", fig("partitioned_w2", "events_per_s", ev), "1 worker",
		scale and ("%.2fx"):format(scale) or "-", ">= 1.5x 1 worker", verdict(scale and scale >= 1.5),
		nruns("partitioned_w2"))

	local p50, p99 = num("live", "p50_ms"), num("live", "p99_ms")
	local wrote = num("live", "writer_events_per_s")
	row(("5 live latency p50 (%s ev/s, %d s)"):format(wrote and ("%.0f"):format(wrote) or LIVE_RATE, LIVE_SECONDS),
		fig("live", "p50_ms", ms),
		"NOTIFY " .. fig("notify", "p50_ms", ms), "", "<= 2 ms", verdict(p50 and p50 <= 2), nruns("live", "notify"))
	row("  live latency p99", fig("live", "p99_ms", ms), "NOTIFY " .. fig("notify", "p99_ms", ms), "",
		"<= 10 ms", verdict(p99 and p99 <= 10), nruns("live", "notify"))
	row("  live latency max", fig("live", "max_ms", ms), "NOTIFY " .. fig("notify", "max_ms", ms), "", "", "",
		nruns("live", "notify"))

	for _, r in ipairs({ { "state_only", "6 peak RSS, catch-up state only" },
		{ "partitioned_w1", "  peak RSS, partitioned, 1 worker" },
		{ "partitioned_w2", "  peak RSS, partitioned, 2 workers" } }) do
		local v = num(r[1], "rss_mb")
		row(r[2], fig(r[1], "rss_mb", mb), "", "", "<= 64 MB", verdict(v and v <= 64), nruns(r[1]))
	end
	row("7 reload (rename -> 'reloaded' logged)", fig("reload", "ms", function(v) return ("%.0f ms"):format(v) end),
		"", "", "", "", nruns("reload"))

	-- rows 8-12 (issue 11): "ratio" is the cost per event against the
	-- comparison (its rate / this rate) unless the target says otherwise
	local function cost(a, b)
		local x, y = num(a, "events_per_s"), num(b, "events_per_s")
		return x and y and y / x
	end
	local function x_s(v) return v and ("%.2fx"):format(v) or "-" end
	local sub = #lines + 1
	local M3 = commas(STORE_N)
	local function scaled(n, full)
		return n == full and "" or (" (scaled from %s)"):format(commas(full))
	end
	local cold = cost("store_all_cold", "store_all")
	row(("8 catch-up, { all }, %s-ev store, no ANALYZE, autovacuum off%s"):format(M3, scaled(STORE_N, 3000000)),
		fig("store_all_cold", "events_per_s", ev), "after ANALYZE " .. fig("store_all", "events_per_s", ev),
		x_s(cold), "cost <= 1.5x analyzed", verdict(cold and cold <= 1.5), nruns("store_all_cold", "store_all"))
	for _, sh in ipairs(SHARES) do
		local c = cost(sh.label, sh.label .. "_own")
		row(("  catch-up, %s, ctx:upsert"):format(sh.what), fig(sh.label, "events_per_s", ev),
			"own store " .. fig(sh.label .. "_own", "events_per_s", ev), x_s(c), "cost <= 1.5x own store",
			verdict(c and c <= 1.5), nruns(sh.label, sh.label .. "_own"))
	end
	local sp50, sp99 = num("store_live", "p50_ms"), num("store_live", "p99_ms")
	local swrote = num("store_live", "writer_events_per_s")
	row(("9 live p50, %s ev projected (%s ev/s, %d s)"):format(M3,
		swrote and ("%.0f"):format(swrote) or LIVE_RATE, STORE_LIVE_SECONDS), fig("store_live", "p50_ms", ms),
		"empty store " .. fig("live", "p50_ms", ms), "", "<= 2 ms", verdict(sp50 and sp50 <= 2), nruns("store_live", "live"))
	row("  live p99", fig("store_live", "p99_ms", ms), "empty store " .. fig("live", "p99_ms", ms), "",
		"<= 10 ms", verdict(sp99 and sp99 <= 10), nruns("store_live", "live"))
	local wide = cost("partitioned_wide", "partitioned_deep")
	local function per(label)
		local r = results.rows[label]
		return r and r.events and r.streams and ("%s streams x %.1f ev"):format(commas(r.streams), r.events / r.streams)
			or "?"
	end
	row(("10 partitioned, %s, in the store"):format(per("partitioned_wide")),
		fig("partitioned_wide", "events_per_s", ev), per("partitioned_deep") .. " " .. fig("partitioned_deep", "events_per_s", ev),
		x_s(wide), "cost <= 2x", verdict(wide and wide <= 2), nruns("partitioned_wide", "partitioned_deep"))
	local aps = function(v) return commas(v) .. " appends/s" end
	for _, a in ipairs({ { "append_empty", ("11 append, %d clients, empty store"):format(PGBENCH_CLIENTS) },
		{ "append_store", ("  append, %d clients, %s-ev store"):format(PGBENCH_CLIENTS, M3) } }) do
		local x, y = num(a[1], "appends_per_s"), num(a[1] .. "_nonotify", "appends_per_s")
		local share = x and y and x / y
		row(a[2], fig(a[1], "appends_per_s", aps), "no NOTIFY " .. fig(a[1] .. "_nonotify", "appends_per_s", aps),
			pct_s(share), ">= 80% of no NOTIFY", verdict(share and share >= 0.8), nruns(a[1], a[1] .. "_nonotify"))
	end
	row(("12 append --file, %s lines%s"):format(commas(FILE_LINES[1]), scaled(FILE_LINES[1], FILE_FULL[1])),
		fig("file_small", "events_per_s", ev), "", "", "", "", nruns("file_small"))
	local fl = cost("file_large", "file_small")
	row(("  append --file, %s lines%s"):format(commas(FILE_LINES[2]), scaled(FILE_LINES[2], FILE_FULL[2])),
		fig("file_large", "events_per_s", ev), commas(FILE_LINES[1]) .. " lines", x_s(fl), "cost <= 1.5x",
		verdict(fl and fl <= 1.5), nruns("file_large", "file_small"))

	-- issue 13's figures
	local secs = function(v) return ("%.2f s"):format(v) end
	local st, stn = num("status_1m", "status_s"), num("status_1m", "status_name_s")
	local sr = results.rows.status_1m
	row(("13 status, %s streams (%s partitions)"):format(sr and sr.streams and commas(sr.streams) or "?",
		sr and sr.partitions and commas(sr.partitions) or "?"), fig("status_1m", "status_s", secs),
		"status NAME " .. fig("status_1m", "status_name_s", secs), "", "< 1 s each",
		verdict(st and stn and st < 1 and stn < 1), nruns("status_1m"))
	local sb, sbd = num("status_behind_1m", "limit_s"), num("status_behind_1m", "default_s")
	local sbr = results.rows.status_behind_1m
	row(("  status NAME --behind, %s of %s behind"):format(sbr and sbr.behind or "?",
		sbr and sbr.partitions and commas(sbr.partitions) or "?"),
		"--limit 20 " .. fig("status_behind_1m", "limit_s", secs),
		"no --limit " .. fig("status_behind_1m", "default_s", secs), "", "< 1 s each",
		verdict(sb and sbd and sb < 1 and sbd < 1), nruns("status_behind_1m"))
	row("  wait_for after an append p50/p99", fig("wait_for", "p50_ms", ms) .. " / " .. fig("wait_for", "p99_ms", ms),
		"", "", "", "", nruns("wait_for"))
	row("  GET /metrics p50/p99", fig("metrics", "p50_ms", ms) .. " / " .. fig("metrics", "p99_ms", ms),
		"", "", "", "", nruns("metrics"))

	-- BENCH_ONLY: only the lines of rows that ran (a "runs" of 0 or 0/0)
	if ONLY then
		local kept, at = {}, nil
		for i, l in ipairs(lines) do
			if i == sub then at = #kept + 1 end
			if not l[7]:match("^0$") and not l[7]:match("^0/0$") then kept[#kept + 1] = l end
		end
		lines, sub = kept, at or #kept + 1
	end
	local head = { "", "projhost", "limit (C, libpq)", "ratio", "target", "", "runs" }
	local head11 = { "issues 11 (at scale), 13 (operations)", "projhost", "compared with", "ratio", "target", "", "runs" }
	if sub > 1 then
		table.insert(lines, sub, head11)
	else
		head = head11
	end
	local width = {}
	for _, l in ipairs({ head, unpack(lines) }) do
		for i, c in ipairs(l) do width[i] = math.max(width[i] or 0, #c) end
	end
	local out = {}
	out[#out + 1] = ("projhost bench: %d cores, %s, %.0f GB RAM; %s"):format(
		m.cores, m.cpu, m.mem_gb, m.postgres_short)
	out[#out + 1] = ("load average %s at the start, %s at the end; %.0f s; medians of the runs shown")
		:format(m.load_start, m.load_end, results.seconds)
	local LEFT = { [1] = true, [5] = true, [6] = true }
	local function fmt(l)
		local cells = {}
		for i, c in ipairs(l) do
			local pad = (" "):rep(width[i] - #c)
			cells[i] = LEFT[i] and c .. pad or pad .. c
		end
		return (table.concat(cells, "  "):gsub("%s+$", ""))
	end
	out[#out + 1] = fmt(head)
	for _, l in ipairs(lines) do out[#out + 1] = fmt(l) end
	for _, k in ipairs({ "cold" }) do
		if notes[k] then out[#out + 1] = notes[k] end
	end
	return table.concat(out, "\n")
end

-- ---------------------------------------------------------------------

local function main()
	local f = io.open(BIN, "rb")
	if not f then error("run me from the repository root after `make build bench/limit` (no ./projhost)", 0) end
	f:close()
	f = io.open(LIMIT, "rb")
	if not f then error("bench/limit is missing: `make bench` builds it", 0) end
	f:close()

	local t_start = core.monotime()
	local load_start = loadavg()
	start_cluster()
	say("cluster in %s: %s", TMP, DSN)
	local m = machine()
	m.load_start = load_start
	results.machine = m

	if wanted_any("main") then
		local conn = load_events(DSN, N_STREAMS, N_EVENTS / N_STREAMS)
		sql(conn, "CREATE TABLE IF NOT EXISTS balances (id text PRIMARY KEY, amount bigint)")
		expected_sum = tonumber(sql(conn, [[SELECT sum(CASE event_type WHEN 'Deposited' THEN 1 ELSE -1 END
			* (data->>'amount')::bigint) AS s FROM projhost.events]])[1].s)
		warm(DSN)
		catchup_rows(conn)
		conn:close()
	end
	partitioned_rows()
	local ldsn = latency_row()
	reload_row(ldsn)
	ops_rows(ldsn)
	-- issue 11
	local t11 = core.monotime()
	store_rows()
	append_empty_rows()
	file_rows()
	results.seconds_rows_8_12 = core.monotime() - t11
	say("rows 8-12 in %.0f s", results.seconds_rows_8_12)

	results.seconds = core.monotime() - t_start
	m.load_end = loadavg()
	local text = report(m)
	results.table = text
	results.notes = notes
	write_file(ROOT .. "/bench/results.json", cjson.encode(results) .. "\n")
	say("done in %.0f s; wrote bench/results.json", results.seconds)
	print(text)
end

local ok, err = xpcall(main, debug.traceback)
local cok, cerr = pcall(stop_cluster)
if not cok then say("cleanup failed: %s", tostring(cerr)) end
if not ok then
	say("FAILED: %s", tostring(err))
	os.exit(1)
end
