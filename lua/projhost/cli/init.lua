-- projhost.cli: the command line - usage, parsing and exit codes - and
-- the dispatch to one module per command group (projhost.cli.run, .append,
-- .status, .control, .db, .test; helpers they share in projhost.cli.util).
--
-- M.main(arg) -> exit code: 0 ok, 1 runtime failure, 2 usage (design §4).
-- M.parse(words) -> cmd | nil, problem, usage    (pure; spec/unit tests it)
--
-- Runtime failures print one line "projhost: <command>: <why>" on stderr;
-- usage errors print the problem and the command's usage on stderr.
local util = require "projhost.cli.util"

local M = {}

local USAGE = {
	run = "projhost run [--db DSN] [--workers N] [--once] [--demo] [--http HOST:PORT] [PATH...]",
	append = "projhost append STREAM TYPE [JSON] [--expected-version N] [--metadata JSON] [--db DSN]\n"
		.. "       projhost append [STREAM] --file EVENTS.ndjson|- [--db DSN]",
	status = "projhost status [NAME] [--json] [--failed] [--behind] [--limit N] [--db DSN]",
	wait = "projhost wait NAME [--stream S --version V] [--timeout SEC] [--db DSN]",
	reset = "projhost reset NAME [--db DSN]",
	pause = "projhost pause NAME [--db DSN]",
	resume = "projhost resume NAME [--partition P] [--db DSN]",
	parked = "projhost parked list|retry|skip [NAME] [--db DSN]",
	db = "projhost db start|stop|url|psql [PSQL-ARGS...]",
	test = "projhost test [SPEC...] [BUSTED-OPTIONS...]",
	help = "projhost help [COMMAND]",
	version = "projhost version",
}

local ORDER = { "run", "append", "status", "wait", "reset", "pause", "resume", "parked", "db", "test", "help",
	"version" }

local HELP_TAIL = [[

Database: --db DSN, else $PROJHOST_DB, else libpq's variables (PGHOST...) if set,
else the embedded cluster under $PROJHOST_HOME (default ./.projhost), started on demand.
--workers: 1 to 64 worker processes. Exit codes: 0 ok, 1 runtime failure
(an unknown projection NAME too), 2 usage.]]

-- Flag kinds: "string", "bool", "version" (integer >= 0), "workers" (an
-- integer from 1 to core.max_workers, the master's limit), "seconds" (a
-- number >= 0, fractions allowed, at most a year).
-- min/max bound the positional words; sub lists allowed first words.
local SPECS = {
	run = { flags = { db = "string", workers = "workers", once = "bool", demo = "bool", http = "string" },
		min = 0, max = math.huge },
	append = { flags = { db = "string", ["expected-version"] = "version", metadata = "string", file = "string" },
		min = 0, max = 3 },
	status = { flags = { db = "string", json = "bool", failed = "bool", behind = "bool", limit = "version" },
		min = 0, max = 1 },
	wait = { flags = { db = "string", stream = "string", version = "version", timeout = "seconds" },
		min = 1, max = 1 },
	reset = { flags = { db = "string" }, min = 1, max = 1 },
	pause = { flags = { db = "string" }, min = 1, max = 1 },
	resume = { flags = { db = "string", partition = "string" }, min = 1, max = 1 },
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

local escape = util.escape

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
				if kind == "seconds" then
					local n = value:match("^%d+%.?%d*$") and tonumber(value)
					if not n or n > 365 * 86400 then
						return nil, ("--%s needs a number of seconds, not '%s'"):format(flag, value), M.usage(name)
					end
					value = n
				elseif kind == "workers" or kind == "version" then
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
	if name == "wait" and (cmd.flags.stream == nil) ~= (cmd.flags.version == nil) then
		return nil, "wait takes --stream and --version together", M.usage(name)
	end
	if name == "wait" and cmd.flags.version == 0 then
		return nil, "--version must be at least 1 (versions start at 1)", M.usage(name)
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

-- command -> the module of its group
local GROUP = {
	run = "run", __worker = "run", append = "append", status = "status", wait = "wait",
	reset = "control", pause = "control", resume = "control", parked = "control",
	db = "db", test = "test",
}

local function help(cmd)
	if cmd.args[1] then util.say(M.usage(cmd.args[1])) else util.say(M.usage()) end
	return 0
end

local function version()
	util.say("projhost " .. require("projhost.core").version)
	return 0
end

function M.main(argv)
	local core, config = require "projhost.core", require "projhost.config"
	-- the log's settings, once per process (the master and every worker pass here)
	core.log_format(config.get("PROJHOST_LOG_FORMAT"))
	core.log_debug(config.get("PROJHOST_DEBUG"))
	local words = {}
	for i = 1, #(argv or {}) do words[i] = argv[i] end
	local cmd, problem, usage = M.parse(words)
	if not cmd then
		io.stderr:write("projhost: ", escape(problem), "\n", usage, "\n")
		return 2
	end
	if cmd.name == "help" then return help(cmd) end
	if cmd.name == "version" then return version() end
	return require("projhost.cli." .. GROUP[cmd.name])[cmd.name](cmd)
end

return M
