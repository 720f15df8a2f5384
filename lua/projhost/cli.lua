-- projhost.cli: command-line dispatch and every command but `run`'s loop.
--
-- M.main(arg) -> exit code: 0 ok, 1 runtime failure, 2 usage (design §4).
-- M.parse(words) -> cmd | nil, problem, usage    (pure; spec/unit tests it)
--
-- Runtime failures print one line "projhost: <command>: <why>" on stderr;
-- usage errors print the problem and the command's usage on stderr.
local cjson = require "projhost.json"

local M = {}

local USAGE = {
	run = "projhost run [--db DSN] [--workers N] [--once] [--demo] [PATH...]",
	append = "projhost append STREAM TYPE [JSON] [--expected-version N] [--metadata JSON] [--db DSN]\n"
		.. "       projhost append [STREAM] --file EVENTS.ndjson|- [--db DSN]",
	status = "projhost status [NAME] [--json] [--db DSN]",
	reset = "projhost reset NAME [--db DSN]",
	pause = "projhost pause NAME [--db DSN]",
	resume = "projhost resume NAME [--db DSN]",
	parked = "projhost parked list|retry|skip [NAME] [--db DSN]",
	db = "projhost db start|stop|url|psql [PSQL-ARGS...]",
	test = "projhost test [SPEC...] [BUSTED-OPTIONS...]",
	help = "projhost help [COMMAND]",
	version = "projhost version",
}

local ORDER = { "run", "append", "status", "reset", "pause", "resume", "parked", "db", "test", "help", "version" }

local HELP_TAIL = [[

Database: --db DSN, else $PROJHOST_DB, else libpq's variables (PGHOST...) if set,
else the embedded cluster under $PROJHOST_HOME (default ./.projhost), started on demand.
--workers: 1 to 64 worker processes. Exit codes: 0 ok, 1 runtime failure
(an unknown projection NAME too), 2 usage.]]

-- Flag kinds: "string", "bool", "version" (integer >= 0), "workers" (an
-- integer from 1 to core.max_workers, the master's limit).
-- min/max bound the positional words; sub lists allowed first words.
local SPECS = {
	run = { flags = { db = "string", workers = "workers", once = "bool", demo = "bool" }, min = 0, max = math.huge },
	append = { flags = { db = "string", ["expected-version"] = "version", metadata = "string", file = "string" },
		min = 0, max = 3 },
	status = { flags = { db = "string", json = "bool" }, min = 0, max = 1 },
	reset = { flags = { db = "string" }, min = 1, max = 1 },
	pause = { flags = { db = "string" }, min = 1, max = 1 },
	resume = { flags = { db = "string" }, min = 1, max = 1 },
	parked = { flags = { db = "string" }, min = 1, max = 2, sub = { list = true, retry = true, skip = true } },
	db = { flags = {}, min = 1, max = 1, sub = { start = true, stop = true, url = true, psql = true },
		rest_after = "psql" },
	test = { raw = true },
	help = { flags = {}, min = 0, max = 1 },
	version = { flags = {}, min = 0, max = 0 },
	__worker = { raw = true },
}

function M.usage(name)
	if name and USAGE[name] then return "usage: " .. USAGE[name] end
	local lines = { "usage:" }
	for _, n in ipairs(ORDER) do lines[#lines + 1] = "  " .. USAGE[n]:gsub("\n       ", "\n  ") end
	return table.concat(lines, "\n") .. "\n" .. HELP_TAIL
end

-- Control characters of what people typed (and of anything else quoted
-- in a message) are shown escaped, by the log's own rule (core.escape).
local function escape(s, max)
	return require("projhost.core").escape(s, max)
end

local function parse_number(kind, flag, text)
	local n = tonumber(text)
	if not text:match("^%d+$") or not n then
		return nil, ("--%s needs a whole number, not '%s'"):format(flag, text)
	end
	if kind == "workers" then
		local max = require("projhost.core").max_workers
		if n < 1 or n > max then return nil, ("--%s must be between 1 and %d, not %s"):format(flag, max, text) end
	end
	-- beyond 2^53 a double no longer holds every whole number
	if n > 2 ^ 53 - 1 then return nil, ("--%s must be at most %d, not %s"):format(flag, 2 ^ 53 - 1, text) end
	return n
end

-- words: array of strings (arg[1..n]). Returns { name=, flags={}, args={}, rest={} }.
function M.parse(words)
	local name = words[1]
	if name == nil then return nil, "no command given", M.usage() end
	if name == "--help" or name == "-h" then name = "help" end
	if name == "--version" then name = "version" end
	local spec = SPECS[name]
	if not spec then return nil, ("unknown command '%s'"):format(name), M.usage() end
	local cmd = { name = name, flags = {}, args = {}, rest = {} }
	if spec.raw then
		for i = 2, #words do cmd.rest[#cmd.rest + 1] = words[i] end
		return cmd
	end
	local i, only_args = 2, false
	while i <= #words do
		local w = words[i]
		if spec.rest_after and cmd.args[1] == spec.rest_after then
			-- `db psql ...`: everything after psql belongs to psql
			cmd.rest[#cmd.rest + 1] = w
		elseif only_args or w == "-" or w:sub(1, 1) ~= "-" then
			cmd.args[#cmd.args + 1] = w
		elseif w == "--" then
			only_args = true
		elseif w == "--help" or w == "-h" then
			return { name = "help", flags = {}, args = { name }, rest = {} }
		else
			local flag, value = w:match("^%-%-([%w%-]+)=(.*)$")
			flag = flag or w:match("^%-%-([%w%-]+)$")
			local kind = flag and spec.flags[flag]
			if not kind then return nil, ("unknown flag '%s' for %s"):format(w, name), M.usage(name) end
			if kind == "bool" then
				if value then return nil, ("--%s takes no value"):format(flag), M.usage(name) end
				cmd.flags[flag] = true
			else
				if not value then
					i = i + 1
					value = words[i]
					if value == nil then return nil, ("--%s needs a value"):format(flag), M.usage(name) end
				end
				if kind == "workers" or kind == "version" then
					local n, problem = parse_number(kind, flag, value)
					if not n then return nil, problem, M.usage(name) end
					value = n
				end
				cmd.flags[flag] = value
			end
		end
		i = i + 1
	end
	local n = #cmd.args
	if name == "append" then
		-- with --file: [STREAM]; without: STREAM TYPE [JSON]
		if cmd.flags.file then
			if n > 1 then return nil, "append --file takes at most a STREAM before it", M.usage(name) end
			if cmd.flags["expected-version"] or cmd.flags.metadata then
				return nil, "--expected-version and --metadata cannot be combined with --file", M.usage(name)
			end
		elseif n < 2 then
			return nil, "append needs STREAM and TYPE (or --file)", M.usage(name)
		end
	end
	if n < spec.min then return nil, ("%s needs more arguments"):format(name), M.usage(name) end
	if n > spec.max then
		return nil, ("too many arguments for %s: '%s'"):format(name, cmd.args[spec.max + 1]), M.usage(name)
	end
	if spec.sub and not spec.sub[cmd.args[1]] then
		return nil, ("unknown %s subcommand '%s'"):format(name, cmd.args[1]), M.usage(name)
	end
	if name == "help" and n == 1 and not USAGE[cmd.args[1]] then
		return nil, ("unknown command '%s'"):format(cmd.args[1]), M.usage()
	end
	return cmd
end

---------------------------------------------------------------------------
-- helpers

-- One line, whatever the message holds (a multi-line one shows its
-- newlines escaped).
local function fail(what, msg)
	io.stderr:write("projhost: ", what, ": ", escape((tostring(msg):gsub("%s+$", ""))), "\n")
	return 1
end

local function say(...)
	io.stdout:write(...)
	io.stdout:write("\n")
end

-- Resolve the DSN (design §4), connect, migrate. -> conn, dsn | nil, msg
local function open_db(cmd)
	local embedded = require "projhost.embedded"
	local dsn, err = embedded.resolve{
		db = cmd.flags.db,
		on_start = function(_, home)
			io.stderr:write("projhost: started the embedded PostgreSQL in ", escape(home),
				" (projhost db stop stops it)\n")
		end,
	}
	if not dsn then return nil, err end
	local core = require "projhost.core"
	local conn, code
	conn, err, code = core.connect(dsn)
	if not conn then return nil, err, code end
	local function note(text) io.stderr:write("projhost: ", escape(text), "\n") end
	local ok
	ok, err, code = require("projhost.schema").migrate(conn, note)
	if not ok then
		conn:close()
		return nil, err, code
	end
	-- an index build failed: reads work, slower; the next start retries
	if err then note(err .. " (reads go on without it; the next start builds it again)") end
	return conn, dsn
end

-- Returns the JSON text when it decodes to an object (not an array/scalar).
local function json_object(text)
	local ok, v = pcall(cjson.decode, text)
	if not ok then return nil, (tostring(v):gsub("^.-:%d+: ", "")) end
	-- cjson decodes {} and [] alike, so look at the text itself.
	if type(v) ~= "table" or not text:match("^%s*{") then
		return nil, "expected a JSON object, got " .. (type(v) == "table" and "an array" or text)
	end
	return v
end

local function exe_path()
	return require("projhost.core").exepath() or arg and arg[0] or "projhost"
end

-- A table of rows as aligned columns; cols = { {key, title, max?}, ... }:
-- every cell escaped (no control character reaches the terminal, a row
-- stays one line), and cut at max bytes when the column has one.
local function print_table(rows, cols)
	local width, cells = {}, {}
	for i, r in ipairs(rows) do
		cells[i] = {}
		for c, col in ipairs(cols) do cells[i][c] = escape(tostring(r[col[1]] or ""), col[3]) end
	end
	for c, col in ipairs(cols) do
		width[c] = #col[2]
		for i = 1, #rows do width[c] = math.max(width[c], #cells[i][c]) end
	end
	local function line(get)
		local parts = {}
		for c = 1, #cols do
			local s = get(c)
			parts[c] = c == #cols and s or s .. string.rep(" ", width[c] - #s)
		end
		say((table.concat(parts, "  "):gsub("%s+$", "")))
	end
	line(function(c) return cols[c][2] end)
	for i = 1, #rows do line(function(c) return cells[i][c] end) end
end

---------------------------------------------------------------------------
-- commands

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
		paths = paths,
		bin = exe_path(),
	}
end

local UUID = "^{?%x%x%x%x%x%x%x%x%-?%x%x%x%x%-?%x%x%x%x%-?%x%x%x%x%-?%x%x%x%x%x%x%x%x%x%x%x%x}?$"

-- Check one decoded NDJSON event like projhost.check_events does, so a bad
-- line is reported as file:line before anything is sent.
local function check_event(ev, default_stream)
	local stream = ev.stream
	if stream == nil then stream = default_stream end
	if type(stream) ~= "string" or stream == "" then
		return nil, default_stream and '"stream" must be a non-empty string' or 'needs a non-empty string "stream"'
	end
	if type(ev.type) ~= "string" or ev.type == "" then return nil, 'needs a non-empty string "type"' end
	for _, k in ipairs({ "data", "metadata" }) do
		local v = ev[k]
		if v ~= nil and v ~= cjson.null and type(v) ~= "table" then return nil, '"' .. k .. '" must be an object' end
	end
	if ev.id ~= nil and (type(ev.id) ~= "string" or not ev.id:match(UUID)) then
		return nil, '"id" must be a UUID string'
	end
	return true
end

local CHUNK = 5000
local STAGE = "SELECT projhost.stage_events($1::jsonb, $2::bigint[]) AS n"

local function as_array(chunk, n)
	return "[" .. table.concat(chunk, ",", 1, n or #chunk) .. "]"
end

local function as_ords(lines, n)
	return "{" .. table.concat(lines, ",", 1, n or #lines) .. "}"
end

-- Which element of a chunk that failed to stage (message msg, SQLSTATE
-- code) made it fail? Only on the failure path, so the bulk path stays one
-- statement per chunk: the load's transaction is aborted and is rolled
-- back (the file is one transaction: nothing of it can commit any more),
-- and in a fresh one, rolled back as well, ever shorter prefixes of the
-- chunk are staged in a savepoint (a binary search: ~13 tries for 5,000
-- lines) - a prefix fails once it holds the first failing element.
-- Staging touches nothing but the chunk, so the chunk alone fails again.
-- -> index, message of that failure, its code | nil (not found)
local function failing_element(conn, chunk, lines)
	conn:exec("ROLLBACK")
	if not conn:exec("BEGIN") then return nil end
	local broken = false -- a probe that could not run proves nothing
	local function fails(n)
		if not conn:exec("SAVEPOINT probe") then
			broken = true
			return false
		end
		local rows, m, c = conn:query(STAGE, as_array(chunk, n), as_ords(lines, n))
		if not conn:exec("ROLLBACK TO SAVEPOINT probe") then broken = true end
		if rows then return false end
		return true, m, c
	end
	local bad, msg, code = fails(#chunk)
	if broken or not bad then return nil end
	local lo, hi = 1, #chunk
	while lo < hi do
		local mid = math.floor((lo + hi) / 2)
		local m, c
		bad, m, c = fails(mid)
		if broken then return nil end
		if bad then
			hi, msg, code = mid, m, c
		else
			lo = mid + 1
		end
	end
	return lo, msg, code
end

-- The line of the staged event behind a failure of append_staged (the
-- transaction is back at the savepoint before it, so the staged rows are
-- there to look at): for a duplicate "id" (23505, the one conflict that
-- checks cannot see) the key in the message names it - the first line
-- with an id already in the store, else the second line with the id.
-- -> line | nil
local function failing_line(conn, msg, code)
	local key = code == "23505" and msg:match("%(event_id%)=%(([^)]*)%)")
	if not key then return nil end
	local rows = conn:query([[SELECT ord, EXISTS (SELECT 1 FROM projhost.events WHERE event_id = $1::uuid) AS taken
		FROM pg_temp.projhost_staged WHERE (e->>'id')::uuid = $1::uuid ORDER BY ord LIMIT 2]], key)
	if not rows or not rows[1] then return nil end
	local r = (rows[1].taken == "t" or not rows[2]) and rows[1] or rows[2]
	return tonumber(r.ord)
end

-- NDJSON bulk load: the whole file in one transaction. Chunks of CHUNK
-- lines are checked and staged (projhost.stage_events, with their line
-- numbers), then one projhost.append_staged moves them all into the store,
-- so each stream's row is written once per file and the streams are
-- locked once, in order. Lines are sent as they are (after validation) so
-- the server parses numbers and empty arrays exactly as written. Every
-- error names the file's line: the Lua-side checks know it, the server's
-- own event checks give an index into the chunk, anything else staging
-- finds (e.g. "\u0000", 22P05; a bad UUID, 22P02) is located by
-- failing_element, and a duplicate id at the end by failing_line.
-- After the commit, tables the load grew are analyzed (analyze_if_grown).
local function append_file(conn, file, default_stream)
	local name = file == "-" and "stdin" or file
	local fh, err
	if file == "-" then
		fh = io.stdin
	else
		fh, err = io.open(file, "rb")
		if not fh then return nil, "cannot read " .. err end
	end
	local ok, msg = conn:exec("BEGIN")
	if not ok then return nil, msg end
	local lineno, chunk, lines, first = 0, {}, {}, nil
	local function abort(m)
		conn:exec("ROLLBACK")
		if fh ~= io.stdin then fh:close() end
		return nil, m
	end
	local function flush()
		if #chunk == 0 then return true end
		local rows, m, code = conn:query(STAGE, as_array(chunk), as_ords(lines))
		if not rows then
			-- the server's own event checks name a 0-based element index
			local idx, rest = m:match("event at index (%d+): (.*)$")
			if idx and lines[tonumber(idx) + 1] then
				return nil, ("%s:%d: %s"):format(name, lines[tonumber(idx) + 1], rest)
			end
			local at, why, c = failing_element(conn, chunk, lines)
			if not at then
				return nil, ("%s:%d-%d: %s [%s]"):format(name, lines[1], lines[#lines], m, tostring(code))
			end
			-- a prefix may have met those checks first (index = its element)
			rest = why:match("event at index %d+: (.*)$")
			if rest then return nil, ("%s:%d: %s"):format(name, lines[at], rest) end
			return nil, ("%s:%d: %s [%s]"):format(name, lines[at], why, tostring(c))
		end
		first = first or lines[1]
		chunk, lines = {}, {}
		return true
	end
	for line in fh:lines() do
		lineno = lineno + 1
		-- a UTF-8 byte order mark is no part of the first line's JSON
		if lineno == 1 then line = line:gsub("^\239\187\191", "") end
		if line:match("%S") then
			local dec, ev = pcall(cjson.decode, line)
			if not dec then
				return abort(("%s:%d: invalid JSON: %s"):format(name, lineno, (tostring(ev):gsub("^.-:%d+: ", ""))))
			end
			if type(ev) ~= "table" or not line:match("^%s*{") then
				return abort(("%s:%d: expected a JSON object"):format(name, lineno))
			end
			local good, problem = check_event(ev, default_stream)
			if not good then return abort(("%s:%d: %s"):format(name, lineno, problem)) end
			if ev.stream == nil then
				-- the line has other keys (it passed the "type" check), so a comma follows
				line = line:gsub("^%s*{", function() return '{"stream":' .. cjson.encode(default_stream) .. "," end, 1)
			end
			chunk[#chunk + 1] = line
			lines[#lines + 1] = lineno
			if #chunk >= CHUNK then
				local sent, m = flush()
				if not sent then return abort(m) end
			end
		end
	end
	local sent, m = flush()
	if not sent then return abort(m) end
	if fh ~= io.stdin then fh:close() end
	if not first then
		conn:exec("ROLLBACK")
		return 0
	end
	ok, msg = conn:exec("SAVEPOINT load")
	if not ok then return abort(msg) end
	local rows, code
	rows, msg, code = conn:query("SELECT projhost.append_staged() AS n")
	if not rows then
		local at = conn:exec("ROLLBACK TO SAVEPOINT load") and failing_line(conn, msg, code)
		conn:exec("ROLLBACK")
		if at then return nil, ("%s:%d: %s [%s]"):format(name, at, msg, tostring(code)) end
		return nil, ("%s:%d-%d: %s [%s]"):format(name, first, lineno, msg, tostring(code))
	end
	ok, msg = conn:exec("COMMIT")
	if not ok then return nil, msg end
	-- outside the load's transaction (see analyze_if_grown); the load is in
	-- whatever this says
	local analyzed, why = conn:query("SELECT analyzed FROM projhost.analyze_if_grown()")
	if not analyzed then fail("append", "loaded, but analyzing afterwards failed: " .. why) end
	return tonumber(rows[1].n)
end

function commands.append(cmd)
	local stream, etype, data = cmd.args[1], cmd.args[2], cmd.args[3]
	local meta = cmd.flags.metadata
	if not cmd.flags.file then
		data = data or "{}"
		local ok, why = json_object(data)
		if not ok then return fail("append", "invalid JSON data: " .. why) end
		if meta then
			ok, why = json_object(meta)
			if not ok then return fail("append", "invalid JSON metadata: " .. why) end
		end
	end
	local conn, err = open_db(cmd)
	if not conn then return fail("append", err) end
	if cmd.flags.file then
		local n, msg = append_file(conn, cmd.flags.file, stream)
		conn:close()
		if not n then return fail("append", msg) end
		say(("appended %d events"):format(n))
		return 0
	end
	-- The validated JSON texts are spliced in verbatim: re-encoding decoded
	-- values would turn [] into {} and round big integers.
	local events = '[{"type":' .. cjson.encode(etype) .. ',"data":' .. data
		.. ',"metadata":' .. (meta or "{}") .. "}]"
	local rows, msg = conn:query("SELECT projhost.append($1, $2, $3::jsonb) AS version",
		stream, cmd.flags["expected-version"], events)
	conn:close()
	if not rows then return fail("append", msg) end
	say(rows[1].version)
	return 0
end

-- A name is known when projhost.checkpoints has it (a projection that has
-- run at least once). -> true | nil, "no projection named X (known: ...)"
local function known(conn, name)
	local rows, msg = conn:query("SELECT DISTINCT projection FROM projhost.checkpoints ORDER BY 1")
	if not rows then return nil, msg end
	local names = {}
	for i, r in ipairs(rows) do
		if r.projection == name then return true end
		names[i] = r.projection
	end
	return nil, ("no projection named %s (known: %s)"):format(name, #names > 0 and table.concat(names, ", ") or "none")
end

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

-- Run sql (params: name) and NOTIFY in one transaction, after checking
-- that the projection exists. -> affected rows | nil, msg
local function change_projection(conn, name, sql)
	local ok, msg = known(conn, name)
	if not ok then return nil, msg end
	ok, msg = conn:exec("BEGIN")
	if not ok then return nil, msg end
	local rows
	rows, msg = conn:query(sql, name)
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

function commands.resume(cmd)
	local name = cmd.args[1]
	local conn, err = open_db(cmd)
	if not conn then return fail("resume", err) end
	local rows, msg = change_projection(conn, name, [[
		WITH old AS (
			SELECT partition, status FROM projhost.checkpoints
			WHERE projection = $1 AND status <> 'running' FOR UPDATE
		)
		UPDATE projhost.checkpoints c SET status = 'running', error = NULL, updated_at = now()
		FROM old WHERE c.projection = $1 AND c.partition = old.partition
		RETURNING old.status]])
	conn:close()
	if not rows then return fail("resume", msg) end
	if #rows == 0 then
		say(("%s: already running"):format(escape(name)))
		return 0
	end
	local counts, parts = {}, {}
	for _, r in ipairs(rows) do counts[r.status] = (counts[r.status] or 0) + 1 end
	for _, s in ipairs({ "paused", "failed", "stopped" }) do
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
		local ok, msg = conn:exec("BEGIN")
		local rows
		if ok then
			rows, msg = conn:query([[UPDATE projhost.parked SET retry_requested = true
				WHERE ($1::text IS NULL OR projection = $1) AND NOT retry_requested
				RETURNING projection, partition]], name)
			ok = rows
		end
		if ok then ok, msg = conn:exec("SELECT pg_notify('projhost', '0 *')") end
		if ok then ok, msg = conn:exec("COMMIT") end
		conn:close()
		if not ok then return fail(what, msg) end
		local n = #rows
		say(("retrying %d parked event%s%s: running hosts apply %s at the next batch "
			.. "(an event that fails again is parked again)"):format(n, n == 1 and "" or "s",
			name and " of " .. escape(name) or "", n == 1 and "it" or "them"))
		return 0
	end
	if sub == "skip" then
		local n, msg = conn:exec("DELETE FROM projhost.parked WHERE $1::text IS NULL OR projection = $1", name)
		conn:close()
		if not n then return fail(what, msg) end
		say(("skipped %d parked event%s%s"):format(n, n == 1 and "" or "s", name and " of " .. escape(name) or ""))
		return 0
	end
	local rows, msg = conn:query([[
		SELECT id, projection, partition, global_position, stream_id, stream_version, event_type, attempts,
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
		{ "global_position", "POSITION" }, { "event", "EVENT" }, { "attempts", "ATTEMPTS" },
		{ "parked_at", "PARKED" }, { "error", "ERROR", 100 } })
	return 0
end

local function exec_psql(dsn, extra)
	local embedded = require "projhost.embedded"
	local path = embedded.psql_path()
	local args = { "psql", dsn }
	for _, a in ipairs(extra) do args[#args + 1] = a end
	local _, err = require("projhost.proc").exec(path, args)
	return fail("db psql", "cannot run " .. path .. ": " .. err)
end

function commands.db(cmd)
	local embedded = require "projhost.embedded"
	local sub = cmd.args[1]
	local what = "db " .. sub
	if sub == "url" then
		say(embedded.dsn())
		return 0
	elseif sub == "start" then
		local dsn, started = embedded.start()
		if not dsn then return fail(what, started) end
		say(started and ("started the embedded PostgreSQL in %s"):format(escape(embedded.home()))
			or ("the embedded PostgreSQL in %s is already running"):format(escape(embedded.home())))
		return 0
	elseif sub == "stop" then
		local ok, was = embedded.stop()
		if not ok then return fail(what, was) end
		say(was and ("stopped the embedded PostgreSQL in %s"):format(escape(embedded.home()))
			or ("the embedded PostgreSQL in %s is not running"):format(escape(embedded.home())))
		return 0
	else -- psql
		local dsn, err = embedded.start()
		if not dsn then return fail(what, err) end
		return exec_psql(dsn, cmd.rest)
	end
end

-- busted inside the host runtime. busted's runner raises (error() with no
-- message) when tests failed and it was not started as a standalone script,
-- so the pcall below is how failures come back.
function commands.test(cmd)
	local out = require "projhost.test_output"
	local words = { [0] = "projhost test", "--output=projhost.test_output" }
	for _, w in ipairs(cmd.rest) do words[#words + 1] = w end
	_G.arg = words
	-- The runner names itself after the chunk that calls it ("@projhost").
	local chunk = assert(loadstring(
		"local runner = ... local rc = runner({ standalone = false }) return rc", "@projhost"))
	local ok, err = pcall(chunk, require "busted.runner")
	if not ok and err ~= nil then io.stderr:write("projhost: test: ", tostring(err), "\n") end
	local failed = out.failed()
	if not ok and failed == 0 then
		-- busted stopped before counting anything (bad option, broken helper)
		out.summary_failed = 1
		failed = 1
	end
	if not out.printed then say(out.summary()) end
	return (failed > 0 or not ok) and 1 or 0
end

function commands.help(cmd)
	if cmd.args[1] then say(M.usage(cmd.args[1])) else say(M.usage()) end
	return 0
end

function commands.version()
	say("projhost " .. require("projhost.core").version)
	return 0
end

function commands.__worker()
	return require("projhost.worker").main()
end

function M.main(argv)
	require("projhost.core").log_debug(require("projhost.config").get("PROJHOST_DEBUG"))
	local words = {}
	for i = 1, #(argv or {}) do words[i] = argv[i] end
	local cmd, problem, usage = M.parse(words)
	if not cmd then
		io.stderr:write("projhost: ", escape(problem), "\n", usage, "\n")
		return 2
	end
	return commands[cmd.name](cmd)
end

return M
