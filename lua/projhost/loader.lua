-- projhost.loader: read projection files, run them in a sandbox, validate
-- and normalize the table they return (design.md §3).
--
-- Every failure a user can cause (bad path, syntax error, wrong shape, a
-- script touching something the sandbox denies) comes back as
-- `nil, "file:line: reason"`; only misuse of this module raises.  One bad
-- file never stops the others from loading: the host keeps serving what is
-- valid and reports the rest (hot reload relies on that).
--
-- A file is source text only ("file: bytecode is not accepted"); its top
-- level runs under the host's budget (M.default_budget) and its init under
-- options.budget, both through guard.call, so a file that loops at load is
-- reported ("file: loading overran its budget of Xs") and left out. The
-- table it returns is read without running any of its metamethods.

local lfs = require "lfs"
local guard = require "projhost.guard"
local P = require "projhost.projection"

-- reads a returned table's metatable without running __metatable
local getmetatable_raw = debug.getmetatable

local M = {}

-- Where sandboxed `print` goes: log_fn(level, msg, path), path = the file
-- that printed. Looked up at call time so the host (or the testing module)
-- can redirect it after scripts are loaded.
function M.log_fn(level, msg, path)
	io.stderr:write("projhost: [", level, "] ", path, ": ", msg, "\n")
end

-- The largest options.budget (seconds): a day. 0 = no limit.
M.MAX_BUDGET = 86400
-- checkpoints.version is an int (schema.lua)
M.MAX_VERSION = 2147483647

-- Seconds a file's top level may run when it is loaded (and its init, if
-- options.budget does not say otherwise): PROJHOST_BUDGET, else 30.
M.default_budget = require("projhost.config").get("PROJHOST_BUDGET")

local FIELDS = {
	name = true, version = true, from = true, partition = true, setup = true,
	reset = true, init = true, when = true, on_error = true, caught_up = true,
	options = true, rebuild = true, every = true, tick = true,
}

-- every = SECONDS (with tick): the shortest and longest interval
M.EVERY_MIN, M.EVERY_MAX = 0.1, 31622400

local FROM_FIELDS = { all = true, stream = true, category = true, types = true }

-- options = { budget = seconds (0..MAX_BUDGET, 0 = no limit), own_events =
-- boolean (receive the events this projection emitted itself) }
local OPTIONS = { budget = true, own_events = true }
local OPTIONS_LIST = "budget, own_events"

-- Names a script asks for by habit; they get a hint instead of a bare
-- "unknown global" so the author knows it is deliberate.
local DENIED = {
	io = true, dofile = true, loadfile = true, load = true, loadstring = true,
	require = true, debug = true, package = true, module = true,
	setfenv = true, getfenv = true, collectgarbage = true, _G = true,
}

-- A raw copy (no metamethod of t runs).
local function copy(t)
	local c = {}
	for k, v in next, t do c[k] = v end
	return c
end

-- A key of a script's table, for a message, without calling anything of it.
local function keyname(k)
	if type(k) == "string" then return "'" .. k .. "'" end
	return "(a " .. type(k) .. " key)"
end

local function basename(path)
	return (path:match("([^/]*)$"))
end

---------------------------------------------------------------------------
-- Hash: identifies a script version in checkpoints and logs (core.hash,
-- the FNV-1a of core/fnv.h; projhost.core comes with the library).
M.hash = require("projhost.core").hash

---------------------------------------------------------------------------
-- Directory listing (lua-filesystem)

local function lower_first(s)
	return (s:gsub("^%u", string.lower))
end

-- The reason of an lfs error ("cannot open x: No such file or directory"),
-- as "no such file or directory".
local function reason_of(err)
	err = tostring(err)
	return lower_first(err:match(": ([^:]*)$") or err)
end

-- list_dir(path) -> names of the regular files in it (symbolic links
-- followed; a dangling link is listed, so loading it reports it) | nil,
-- reason, is_a_file
local function list_dir(path)
	local mode, err = lfs.attributes(path, "mode")
	if not mode then return nil, reason_of(err), false end
	if mode == "file" then return nil, "not a directory", true end
	if mode ~= "directory" then return nil, "not a regular file or directory", false end
	local ok, iter, dir = pcall(lfs.dir, path)
	if not ok then return nil, reason_of(iter), false end
	local prefix = path:sub(-1) == "/" and path or path .. "/"
	local names = {}
	for name in iter, dir do
		if name ~= "." and name ~= ".." then
			local m = lfs.attributes(prefix .. name, "mode")
			if m == "file" or m == nil then names[#names + 1] = name end
		end
	end
	return names
end

---------------------------------------------------------------------------
-- Locating lines for error messages.  Runtime values carry no source
-- position, so we look for the field's assignment in the text.

local function escape(s)
	return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

local function lines_of(source)
	local lines = {}
	for line in (source .. "\n"):gmatch("([^\n]*)\n") do
		lines[#lines + 1] = line
	end
	return lines
end

-- Line of `field = ...` (or `["field"] = ...`), else of the last `return`,
-- else 1.  A function value knows its own line.
local function line_of(src_lines, field, value)
	if type(value) == "function" then
		local info = debug.getinfo(value, "S")
		if info and info.linedefined and info.linedefined > 0 then
			return info.linedefined
		end
	end
	if type(field) == "string" then
		local f = escape(field)
		local pats = {
			"^%s*" .. f .. "%s*=[^=]", "^%s*" .. f .. "%s*=$",
			"[{,;]%s*" .. f .. "%s*=[^=]", "[{,;]%s*" .. f .. "%s*=$",
			"%[%s*[\"']" .. f .. "[\"']%s*%]%s*=",
		}
		for i, line in ipairs(src_lines) do
			for _, p in ipairs(pats) do
				if line:match(p) then return i end
			end
		end
	end
	for i = #src_lines, 1, -1 do
		if src_lines[i]:match("^%s*return%f[%W]") then return i end
	end
	return 1
end

---------------------------------------------------------------------------
-- Sandbox

-- A name a script used, for a message (a global name is always a string;
-- os[k] may be anything).
local function namestr(k)
	return type(k) == "string" and k or "(a " .. type(k) .. ")"
end

local function sandbox(path)
	-- string methods lose dump VM-wide before any script runs (guard.lua)
	guard.protect_strings()
	local env = {
		assert = assert, error = error, ipairs = ipairs, next = next,
		pairs = pairs, pcall = pcall, select = select, tonumber = tonumber,
		tostring = tostring, type = type, unpack = unpack,
		-- the handler runs after the error unwound, so the budget's hook can
		-- stop a handler that loops (see guard.xpcall)
		xpcall = guard.xpcall,
		rawget = rawget, rawset = rawset, rawequal = rawequal,
		setmetatable = setmetatable,
		string = copy(string), table = copy(table), math = copy(math),
		json = P.script_json(),
	}
	-- No bytecode round trips: loading is denied anyway, dumping has no use.
	env.string.dump = nil
	-- The string metatable is shared by the whole VM; handing it out would
	-- let one script change string methods for every other script.
	env.getmetatable = function(v)
		if type(v) == "string" then return nil end
		return getmetatable(v)
	end
	env.os = setmetatable({ time = os.time, clock = os.clock, date = os.date }, {
		__index = function(_, k)
			error("os." .. namestr(k) .. " is not available in the projection sandbox", 2)
		end,
	})
	env.print = function(...)
		local parts = {}
		for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
		M.log_fn("info", table.concat(parts, " "), path)
	end
	return setmetatable(env, {
		__index = function(_, k)
			if DENIED[k] then
				error("unknown global '" .. namestr(k)
					.. "' (not available in the projection sandbox)", 2)
			end
			error("unknown global '" .. namestr(k) .. "'", 2)
		end,
		__newindex = function(_, k)
			error("assignment to undeclared global '" .. namestr(k)
				.. "' (declare it local)", 2)
		end,
	})
end

---------------------------------------------------------------------------
-- Validation.  Each check returns a reason; the caller adds file:line.
--
-- The tables a script returns are read without running any of its code: a
-- definition table (the projection, from, from.types, when, options, the
-- setup and reset arrays) with a metatable is rejected (an __index could
-- raise, loop or answer differently each time), keys are named without
-- tostring, and the def keeps copies, so a handler that changes its tables
-- later changes nothing. Numbers must be finite and in range.

local function has_mt(t)
	return getmetatable_raw(t) ~= nil
end

local function is_array_of_strings(t, allow_empty_strings)
	if type(t) ~= "table" then return false end
	local n = #t
	for k, v in next, t do
		if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 then return false end
		if type(v) ~= "string" or (not allow_empty_strings and v == "") then
			return false
		end
	end
	return true
end

-- Keys in a stable order: strings sorted, then the others (named by type).
local function sorted_keys(t)
	local keys = {}
	for k in next, t do keys[#keys + 1] = k end
	table.sort(keys, function(a, b)
		local sa, sb = type(a) == "string", type(b) == "string"
		if sa and sb then return a < b end
		if sa ~= sb then return sa end
		return type(a) < type(b)
	end)
	return keys
end

local function finite(x)
	return type(x) == "number" and x == x and x > -math.huge and x < math.huge
end

-- Returns the normalized def, or nil, line, reason.
local function validate(t, path, src_lines)
	local function fail(field, value, reason)
		return nil, line_of(src_lines, field, value), reason
	end
	local function not_plain(what)
		return "'" .. what .. "' must be a plain table (it has a metatable)"
	end

	if has_mt(t) then
		return fail(nil, nil, "the projection table must not have a metatable")
	end
	for _, k in ipairs(sorted_keys(t)) do
		if type(k) ~= "string" then
			return fail(nil, nil, "unknown field " .. keyname(k))
		elseif not FIELDS[k] then
			return fail(k, t[k], "unknown field " .. keyname(k))
		end
	end

	local def = {}

	local name = t.name
	if name == nil then
		name = basename(path):gsub("%.lua$", "")
		if not name:match("^[%w_%-%.]+$") then
			return fail(nil, nil, "the file name '" .. name .. "' is not a valid projection "
				.. "name (letters, digits, _ - .); set 'name'")
		end
	elseif type(name) ~= "string" or not name:match("^[%w_%-%.]+$") then
		return fail("name", name, "'name' must be a string of letters, digits, _ - . (got "
			.. (type(name) == "string" and ("'" .. name .. "'") or type(name)) .. ")")
	end
	if name == "host" or name == "worker" then
		-- a log line's who (core/log.c): the process's own lines
		return fail("name", name, "'" .. name .. "' names the host's own log lines; choose another name")
	end
	def.name = name

	local version = t.version
	if version == nil then
		version = 1
	elseif not finite(version) or version < 1 or version > M.MAX_VERSION or version % 1 ~= 0 then
		return fail("version", version, "'version' must be an integer from 1 to " .. M.MAX_VERSION
			.. " (got " .. (type(version) == "number" and ("%.17g"):format(version) or type(version)) .. ")")
	end
	def.version = version

	local from = t.from
	if from == nil then
		return fail(nil, nil, "missing 'from' (e.g. from = { category = \"account\" })")
	elseif type(from) ~= "table" then
		return fail("from", from, "'from' must be a table (got " .. type(from) .. ")")
	end
	if has_mt(from) then return fail("from", from, not_plain("from")) end
	for _, k in ipairs(sorted_keys(from)) do
		if type(k) ~= "string" then
			return fail("from", from, "unknown field in 'from' " .. keyname(k))
		elseif not FROM_FIELDS[k] then
			return fail(k, from[k], "unknown field 'from." .. k .. "'")
		end
	end
	local kinds = {}
	if from.all ~= nil then kinds[#kinds + 1] = "all" end
	if from.stream ~= nil then kinds[#kinds + 1] = "stream" end
	if from.category ~= nil then kinds[#kinds + 1] = "category" end
	if #kinds ~= 1 then
		return fail("from", from, "'from' needs exactly one of all = true, stream = \"...\", "
			.. "category = \"...\" (got " .. (#kinds == 0 and "none" or table.concat(kinds, ", ")) .. ")")
	end
	local kind = kinds[1]
	if kind == "all" then
		if from.all ~= true then
			return fail("all", from.all, "'from.all' must be true")
		end
		def.from = { all = true }
	else
		local v = from[kind]
		if type(v) ~= "string" or v == "" then
			return fail(kind, v, "'from." .. kind .. "' must be a non-empty string")
		end
		-- A category is what precedes the first '-', so one containing '-'
		-- could never match any stream.
		if kind == "category" and v:find("-", 1, true) then
			return fail(kind, v, "'from.category' must not contain '-' (the category of "
				.. "'account-42' is 'account')")
		end
		def.from = { [kind] = v }
	end
	if from.types ~= nil then
		if has_mt(from.types) then return fail("types", from.types, not_plain("from.types")) end
		if not is_array_of_strings(from.types) or #from.types == 0 then
			return fail("types", from.types, "'from.types' must be a non-empty array of "
				.. "non-empty event type strings")
		end
		def.types = copy(from.types)
	end

	local partition = t.partition
	if partition ~= nil and partition ~= "stream" then
		return fail("partition", partition, "'partition' must be \"stream\" or omitted (got "
			.. (type(partition) == "string" and partition or type(partition)) .. ")")
	end
	def.partition = partition

	for _, field in ipairs({ "setup", "reset" }) do
		local v = t[field]
		if v == nil then
			def[field] = {}
		elseif type(v) == "string" then
			def[field] = { v }
		elseif has_mt(v) then
			return fail(field, v, not_plain(field))
		elseif is_array_of_strings(v, true) then
			def[field] = copy(v)
		else
			return fail(field, v, "'" .. field .. "' must be a SQL string or an array of "
				.. "SQL strings")
		end
	end

	if t.init ~= nil and type(t.init) ~= "function" then
		return fail("init", t.init, "'init' must be a function returning the initial state")
	end
	def.init = t.init or function() return {} end

	local when = t.when
	if when == nil then
		return fail(nil, nil, "missing 'when' (a table of event type = handler function)")
	elseif type(when) ~= "table" then
		return fail("when", when, "'when' must be a non-empty table of event type = "
			.. "handler function")
	elseif has_mt(when) then
		return fail("when", when, not_plain("when"))
	elseif next(when) == nil then
		return fail("when", when, "'when' must be a non-empty table of event type = "
			.. "handler function")
	end
	for _, k in ipairs(sorted_keys(when)) do
		local h = when[k]
		if type(k) ~= "string" or k == "" then
			return fail("when", when, "'when' keys must be event type strings or \"*\" (got "
				.. (k == "" and "''" or "a " .. type(k) .. " key") .. ")")
		end
		if type(h) ~= "function" then
			return fail(k, h, "handler for '" .. k .. "' must be a function (got "
				.. type(h) .. ")")
		end
	end
	def.when = copy(when)

	for _, field in ipairs({ "on_error", "caught_up" }) do
		local v = t[field]
		if v ~= nil and type(v) ~= "function" then
			return fail(field, v, "'" .. field .. "' must be a function")
		end
		def[field] = v
	end

	-- every = SECONDS + tick(s, ctx, now): an unpartitioned projection's
	-- tick, in a batch of its own at that interval (worker/timers.lua)
	local every, tick = t.every, t.tick
	if every ~= nil or tick ~= nil then
		if def.partition ~= nil then
			return fail(every ~= nil and "every" or "tick", every ~= nil and every or tick,
				"'every' and 'tick' need an unpartitioned projection (omit 'partition')")
		end
		if every == nil then
			return fail("tick", tick, "'tick' needs 'every' (seconds between ticks)")
		elseif tick == nil then
			return fail("every", every, "'every' needs 'tick' (a function(s, ctx, now))")
		end
		if not (finite(every) and every >= M.EVERY_MIN and every <= M.EVERY_MAX) then
			return fail("every", every, "'every' must be a number of seconds from " .. M.EVERY_MIN .. " to "
				.. M.EVERY_MAX .. " (got " .. (type(every) == "number" and tostring(every) or type(every)) .. ")")
		end
		if type(tick) ~= "function" then
			return fail("tick", tick, "'tick' must be a function(s, ctx, now) (got " .. type(tick) .. ")")
		end
		def.every, def.tick = every, tick
	end

	local options = t.options
	if options == nil then
		options = {}
	elseif type(options) ~= "table" then
		return fail("options", options, "'options' must be a table")
	elseif has_mt(options) then
		return fail("options", options, not_plain("options"))
	end
	for _, k in ipairs(sorted_keys(options)) do
		if not OPTIONS[k] then
			return fail(type(k) == "string" and k or "options", options[k], "unknown option " .. keyname(k)
				.. " (known: " .. OPTIONS_LIST .. ")")
		end
	end
	local budget = options.budget
	if budget ~= nil and not (finite(budget) and budget >= 0 and budget <= M.MAX_BUDGET) then
		return fail("budget", budget, "'options.budget' must be a number of seconds from 0 (no limit) to "
			.. M.MAX_BUDGET .. " (got " .. (type(budget) == "number" and tostring(budget) or type(budget)) .. ")")
	end
	local own = options.own_events
	if own ~= nil and type(own) ~= "boolean" then
		return fail("own_events", own, "'options.own_events' must be true or false (got " .. type(own) .. ")")
	end
	def.options = copy(options)
	-- resolved, so the worker has one place to look
	def.budget = budget or M.default_budget
	def.own_events = own == true

	-- How a version change rebuilds: "shadow" (new state and checkpoints
	-- beside the serving version, switched over once caught up) or
	-- "in_place" (run `reset`, start over). A projection with `reset` SQL
	-- clears shared tables, so it rebuilds in place unless it says otherwise.
	local rebuild = t.rebuild
	if rebuild ~= nil and rebuild ~= "shadow" and rebuild ~= "in_place" then
		return fail("rebuild", rebuild, "'rebuild' must be \"shadow\" or \"in_place\" (got "
			.. (type(rebuild) == "string" and rebuild or type(rebuild)) .. ")")
	end
	def.rebuild = rebuild or (#def.reset > 0 and "in_place" or "shadow")

	-- The types this projection can see, for the worker's SQL filter.
	local filter
	if def.when["*"] then
		filter = def.types and copy(def.types)
	else
		local allowed
		if def.types then
			allowed = {}
			for _, ty in ipairs(def.types) do allowed[ty] = true end
		end
		filter = {}
		for ty, h in next, def.when do
			if allowed and not allowed[ty] then
				-- Would never run: almost certainly a typo in one of the lists.
				return fail(ty, h, "handler for '" .. ty .. "' can never run: '" .. ty
					.. "' is not in from.types")
			end
			filter[#filter + 1] = ty
		end
	end
	if filter then
		-- Deduplicate (from.types may repeat) and sort.
		local seen, out = {}, {}
		for _, ty in ipairs(filter) do
			if not seen[ty] then seen[ty] = true; out[#out + 1] = ty end
		end
		table.sort(out)
		filter = out
	end
	def.type_filter = filter

	return def
end

---------------------------------------------------------------------------
-- Public API

-- Text that LuaJIT would take for bytecode: it begins with "\27" (luajit -b
-- writes "\27LJ"), also after a UTF-8 BOM and a "#!" line, which the lexer
-- skips. LuaJIT does not verify bytecode: a crafted file escapes the
-- sandbox, a corrupted one crashes the process. load(..., "t") refuses it
-- too; this check is first so the message is always the same.
local function is_bytecode(text)
	local i = 1
	if text:sub(1, 3) == "\239\187\191" then i = 4 end
	if text:sub(i, i) == "#" then
		local nl = text:find("\n", i, true)
		if not nl then return false end
		i = nl + 1
	end
	return text:sub(i, i) == "\27"
end

-- Load a projection from source text; `path` names it in messages.
function M.load_source(source, path)
	assert(type(source) == "string", "load_source: source must be a string")
	assert(type(path) == "string", "load_source: path must be a string")
	if is_bytecode(source) then return nil, path .. ": bytecode is not accepted" end
	-- Plain Lua's load does not skip a "#!" line the way loadfile does;
	-- comment it out so line numbers stay right.
	local text = source
	if text:sub(1, 1) == "#" then text = "--" .. text end
	local env = sandbox(path)
	local chunk, err = load(text, "@" .. path, "t", env)
	if not chunk then return nil, guard.errtext(err) end

	-- A file's options.budget is not known before its top level ran, so
	-- that runs under the host's budget.
	local ok, t, kind = guard.call(M.default_budget, chunk)
	if not ok then
		if kind == "budget" then return nil, path .. ": loading " .. t end
		if t:sub(1, #path + 1) ~= path .. ":" then t = path .. ": " .. t end
		return nil, t
	end
	local src_lines = lines_of(source)
	if type(t) ~= "table" then
		return nil, ("%s:%d: the file must return a projection table (got %s)")
			:format(path, line_of(src_lines), type(t))
	end

	local def, line, reason = validate(t, path, src_lines)
	if not def then
		return nil, ("%s:%d: %s"):format(path, line, reason)
	end

	-- Run init once now so a broken one is reported at load, not on the
	-- first event.
	local init_line = line_of(src_lines, "init", t.init)
	local iok, state, ikind = guard.call(def.budget, def.init)
	if not iok then
		if ikind == "budget" then
			return nil, ("%s:%d: init %s"):format(path, init_line, state)
		end
		if state:sub(1, #path + 1) ~= path .. ":" then
			state = ("%s:%d: init failed: %s"):format(path, init_line, state)
		end
		return nil, state
	elseif type(state) ~= "table" then
		return nil, ("%s:%d: init must return a table (got %s)")
			:format(path, init_line, type(state))
	end

	def.file = path
	def.source = source
	def.hash = M.hash(source)
	return def
end

function M.load_file(path)
	assert(type(path) == "string", "load_file: path must be a string")
	local f, err = io.open(path, "rb")
	if not f then
		return nil, path .. ": " .. lower_first((err:gsub("^.-: ", "")))
	end
	local source, rerr = f:read("*a")
	f:close()
	if not source then
		return nil, path .. ": " .. lower_first(tostring(rerr))
	end
	return M.load_source(source, path)
end

local function wanted(name)
	return name:match("%.lua$") and not name:match("^[%._]")
		and not name:match("_spec%.lua$")
end

-- Load every projection under `paths` (files and/or directories).  Returns
-- the defs sorted by name and an array of error strings (possibly empty).
function M.load_paths(paths)
	assert(type(paths) == "table", "load_paths: paths must be an array")
	local files, errors, seen = {}, {}, {}
	local function add(file)
		if not seen[file] then
			seen[file] = true
			files[#files + 1] = file
		end
	end
	for _, path in ipairs(paths) do
		local names, reason, not_dir = list_dir(path)
		if names then
			table.sort(names)
			local prefix = path:sub(-1) == "/" and path or path .. "/"
			for _, n in ipairs(names) do
				if wanted(n) then add(prefix .. n) end
			end
		elseif not_dir then
			add(path)
		else
			errors[#errors + 1] = path .. ": " .. reason
		end
	end

	local defs, by_name = {}, {}
	for _, file in ipairs(files) do
		local def, err = M.load_file(file)
		if not def then
			errors[#errors + 1] = err
		elseif by_name[def.name] then
			errors[#errors + 1] = ("%s:%d: duplicate projection name '%s' (also defined in %s)")
				:format(file, line_of(lines_of(def.source), "name"), def.name,
					by_name[def.name].file)
		else
			by_name[def.name] = def
			defs[#defs + 1] = def
		end
	end
	table.sort(defs, function(a, b) return a.name < b.name end)
	return defs, errors
end

return M
