-- projhost.cli.run: `projhost run` (demo events, waiting for the
-- database, then projhost.run's loop) and the worker processes it starts.
local cjson = require "projhost.json"
local util = require "projhost.cli.util"
local fail, open_db, exe_path = util.fail, util.open_db, util.exe_path

local commands = {}

-- Deterministic demo data: 20 account streams, deposits and withdrawals,
-- some withdrawals >= 100 so example projections have something to flag.
local function seed_demo(conn)
	local ok, msg = conn:exec("BEGIN")
	if not ok then return nil, msg end
	local function abort(m) conn:exec("ROLLBACK") return nil, m end
	-- Two hosts started with --demo at once must not both seed.
	ok, msg = conn:exec("SELECT pg_advisory_xact_lock(hashtext('projhost.demo'))")
	if not ok then return abort(msg) end
	local rows
	rows, msg = conn:query("SELECT EXISTS (SELECT 1 FROM projhost.events) AS any")
	if not rows then return abort(msg) end
	if rows[1].any == "t" then
		conn:exec("ROLLBACK")
		return 0
	end
	local seed, events = 12345, {}
	local function rand(n) -- tiny LCG: the same demo everywhere
		seed = (seed * 1103515245 + 12345) % 2147483648
		return math.floor(seed / 65536) % n -- the low bits of an LCG cycle quickly
	end
	for i = 1, 2000 do
		local stream = "account-" .. (rand(20) + 1)
		local ev
		if i <= 20 or rand(3) > 0 then
			ev = { stream = stream, type = "Deposited", data = { amount = 10 + rand(490) } }
		else
			ev = { stream = stream, type = "Withdrawn", data = { amount = 5 + rand(150) } }
		end
		events[#events + 1] = cjson.encode(ev)
	end
	rows, msg = conn:query("SELECT projhost.append_many($1::jsonb) AS n", "[" .. table.concat(events, ",") .. "]")
	if not rows then return abort(msg) end
	ok, msg = conn:exec("COMMIT")
	if not ok then return nil, msg end
	return tonumber(rows[1].n)
end

-- `run` waits for its database: an unreachable server is one log line,
-- then retries with backoff until it answers (or the operator stops us).
local function open_db_waiting(cmd)
	local core = require "projhost.core"
	local delay, logged = 0.5, false
	while true do
		local conn, dsn, code = open_db(cmd)
		if conn then
			if logged then core.log("info", "host", "database reachable again") end
			return conn, dsn
		end
		-- only connection failures are worth waiting for (SQLSTATE class
		-- 08), and --once is a batch job: it reports and exits instead
		if cmd.flags.once or not (code and code:match("^08")) then return nil, dsn end
		if not logged then
			core.log("error", "host", "database unreachable: " .. tostring(dsn):gsub("\n.*", "")
				.. "; retrying with backoff")
			logged = true
		end
		core.sleep(delay)
		delay = math.min(delay * 2, 30)
	end
end

function commands.run(cmd)
	local conn, dsn = open_db_waiting(cmd)
	if not conn then return fail("run", dsn) end
	if cmd.flags.demo then
		local n, err = seed_demo(conn)
		if not n then
			conn:close()
			return fail("run", "seeding demo events: " .. err)
		end
		if n > 0 then
			io.stderr:write(("projhost: run: seeded %d demo events (Deposited/Withdrawn over account-1..account-20)\n")
				:format(n))
		end
	end
	conn:close()
	local ok, run = pcall(require, "projhost.run")
	if not ok then return fail("run", "cannot load projhost.run: " .. tostring(run)) end
	local paths = #cmd.args > 0 and cmd.args or { "projections" }
	return run.main{
		dsn = dsn,
		workers = cmd.flags.workers or 1,
		once = cmd.flags.once == true,
		-- --http ADDR, else PROJHOST_HTTP; "" (or neither) serves none
		http = cmd.flags.http or require("projhost.config").get("PROJHOST_HTTP"),
		paths = paths,
		bin = exe_path(),
	}
end

function commands.__worker()
	return require("projhost.worker").main()
end

return commands
