-- projhost.projection: the run-time semantics of a loaded projection, shared
-- by the worker (backend = PostgreSQL) and projhost.testing (backend =
-- recorder), so a spec exercises exactly what production runs.
--
-- Error policy of ctx: when the backend reports a failure (nil, msg, code),
-- ctx:exec/query/emit RAISE "ctx:<method>: <msg> [<code>]" at the handler's
-- line instead of returning nil, msg.  A failed statement aborts the batch
-- transaction in PostgreSQL, so nothing the handler does afterwards could
-- commit anyway; raising stops it at once and hands the error to the
-- worker, which rolls back to before the event and applies on_error.  A
-- handler that wants to survive a failing statement can still pcall it.
-- Misuse (wrong argument types) raises too: it is a bug in the script.
--
-- In the host, ctx:exec is pipelined (the worker's backend queues it and
-- returns at once), so its error surfaces at the next ctx:query/emit or at
-- the end of the batch; the worker charges it to the event that issued the
-- statement all the same. ctx:upsert buffers rows and writes them in sets
-- (one statement per table per batch).

local guard = require "projhost.guard"
local reads = require "projhost.reads"
local errtext = guard.errtext
local getmetatable_raw = debug.getmetatable

local M = {}

-- The one JSON configuration (projhost.json); scripts get M.script_json(),
-- which exposes encode, decode and null only.
local json = require "projhost.json"
M.json = json

-- JSON null as it comes out of decode (the same value for every cjson
-- instance).
local null = json.null
M.null = null

---------------------------------------------------------------------------
-- Events
--
-- The worker's events fetch id, data, metadata and time on first use: the
-- worker gives the loader once (M.set_lazy) and makes each event with
-- M.event(t). The metatable is this module's, one for every event, and
-- protected: a script's getmetatable(e) returns false and setmetatable(e,
-- ...) raises, so one projection cannot patch how another's events read.
-- Host code that needs to recognize an event uses debug.getmetatable.
local lazy -- fn(e, k) -> value of field k (nil: none), see set_lazy

local EVENT_MT = {
	__index = function(e, k)
		local f = lazy
		if not f then return nil end
		local v = f(e, k)
		if v ~= nil then rawset(e, k, v) end
		return v
	end,
	__metatable = false,
}

-- Do not assign it: make events with M.event (it stays here for code that
-- compares with debug.getmetatable).
M.event_mt = EVENT_MT

-- fn(e, k) loads the field k of event e the first time a handler reads a
-- field the event table does not hold; its (non-nil) result is stored in
-- e, so it is asked once per field and event. nil: no lazy fields.
function M.set_lazy(fn)
	assert(fn == nil or type(fn) == "function", "set_lazy: fn must be a function or nil")
	lazy = fn
end

-- t (a table of the event's fields) as an event; returns t. An event
-- already (the worker looks at a page's last event before the page's
-- events are made) stays as it is: its metatable is protected.
function M.event(t)
	if getmetatable_raw(t) == EVENT_MT then return t end
	return setmetatable(t, EVENT_MT)
end

-- Which events a projection sees, the one home of the rule for the worker
-- (whose reads filter the source in SQL, see projhost.reads) and for
-- projhost.testing: its source (all, a category - the part of the stream
-- before its first '-' - or one stream) and its `types`, if any.
local type_sets = setmetatable({}, { __mode = "k" }) -- def -> { [type] = true }

function M.sees_type(def, etype)
	local filter = def.type_filter
	if not filter then return true end
	local set = type_sets[def]
	if not set then
		set = {}
		for _, t in ipairs(filter) do set[t] = true end
		type_sets[def] = set
	end
	return set[etype] == true
end

function M.reads_stream(def, stream)
	local from = def.from
	if from.stream then return stream == from.stream end
	if from.category then return reads.category(stream) == from.category end
	return true
end

function M.sees(def, stream, etype)
	return M.reads_stream(def, stream) and M.sees_type(def, etype)
end

local function is_event(v)
	local mt = getmetatable_raw(v)
	return mt ~= nil and mt == M.event_mt
end

-- Stored as JSON (kept in the state, sent as a parameter) an event must
-- still be the event, so when a value cannot be encoded as it is, events
-- in it are replaced by plain tables of their fields and the encoding is
-- tried again.
local function plain(v, seen)
	if type(v) ~= "table" then return v end
	if is_event(v) then
		return { id = v.id, stream = v.stream, version = v.version, position = v.position, type = v.type,
			data = v.data, metadata = v.metadata, time = v.time }
	end
	if seen[v] then return seen[v] end
	local t = {}
	seen[v] = t
	for k, x in next, v do t[k] = plain(x, seen) end
	return t
end

-- v as JSON text: true, text | false, message (like pcall(json.encode, v)).
function M.encode(v)
	local ok, s = pcall(json.encode, v)
	if not ok and type(v) == "table" then
		local ok2, s2 = pcall(json.encode, plain(v, {}))
		if ok2 then return ok2, s2 end
	end
	if not ok then s = errtext(s) end
	return ok, s
end
local encode = M.encode

-- The `json` global of a sandbox: encode and decode as the host stores
-- (M.json, events included), and null. A new table per call, so a script
-- replacing json.encode changes its own file only; none of the instance's
-- configuration functions are reachable from it.
function M.script_json()
	return {
		encode = function(v)
			local ok, s = encode(v)
			if not ok then error(s, 2) end
			return s
		end,
		decode = function(text) return json.decode(text) end,
		null = null,
	}
end

-- State as stored (jsonb text); nil, msg if the state cannot be stored.
function M.encode_state(state)
	local ok, s = encode(state)
	if not ok then return nil, "state cannot be stored as JSON: " .. s end
	return s
end

function M.decode_state(text)
	return json.decode(text)
end

-- The handler for an event type: the exact one, else the "*" catch-all.
function M.handler(def, event_type)
	return def.when[event_type] or def.when["*"]
end

function M.init_state(def)
	local s = def.init and def.init()
	if s == nil then return {} end
	if type(s) ~= "table" then
		error(("%s: init returned a %s, expected a table"):format(def.name, type(s)), 2)
	end
	return s
end

-- Apply one event.  The handler mutates `state` in place or returns a new
-- table; returning anything else is a bug we report with the handler's
-- definition line.  Errors propagate: the caller decides (pcall + rollback).
-- What projection code is given of an event: a table of its own with the
-- event's fields (and the same lazy ones), so nothing it writes into it -
-- an assignment, a rawset, a field it made load - reaches the host's
-- event, whose position, version, stream, tx, partition and index say
-- what the batch commits, where the next read starts, what a failure
-- plan retries and what is parked (before: `e.position = e.position +
-- 1000` in a handler moved a checkpoint past 1,000 events never applied).
-- The fields are named, not copied with next() (a trace abort on every
-- event in LuaJIT 2.1); an event has no others (see projhost.reads'
-- EVENT_FIELDS and the worker's partition/index; projhost.testing's
-- events are made of the same names).
local function view(e)
	if rawget(e, "timer") then return M.timer_view(e) end
	return setmetatable({
		position = rawget(e, "position"), version = rawget(e, "version"),
		stream = rawget(e, "stream"), type = rawget(e, "type"),
		id = rawget(e, "id"), tx = rawget(e, "tx"), data = rawget(e, "data"),
		metadata = rawget(e, "metadata"), time = rawget(e, "time"),
		partition = rawget(e, "partition"), index = rawget(e, "index"),
		_page = rawget(e, "_page"), _row = rawget(e, "_row"),
	}, EVENT_MT)
end
M.view = view

-- A timer as a handler sees it (the worker's item: worker/timers.lua):
-- timer = true, type, data, key, time (the due time, written as events'
-- times are), stream (its partition; nil for an unpartitioned
-- projection's), no position, version or id. The item's own position is
-- the host's (a negative number naming the timer row to the watchdog and
-- the failure path), never shown.
function M.timer_view(e)
	local part = rawget(e, "partition")
	return {
		timer = true, type = rawget(e, "type"), key = rawget(e, "key"),
		data = rawget(e, "data"), metadata = {}, time = rawget(e, "time"),
		stream = part ~= "" and part or nil, partition = part, index = rawget(e, "index"),
		-- (ctx:done in a timer's handler: the version its partition is at)
		_after = rawget(e, "_after"),
	}
end

-- Limits of ctx:schedule's arguments (README "Timers"): bytes of a type and
-- a key, the latest `at` (9999-12-31T23:59:59Z, the last second a
-- timestamptz prints with four digits) and the longest delay (100 years).
M.TIMER_TYPE_MAX, M.TIMER_KEY_MAX = 1024, 1024
M.TIMER_AT_MAX, M.TIMER_DELAY_MAX = 253402300799, 3153600000

function M.apply(def, state, e, ctx)
	if rawget(e, "tick") then
		-- every = SECONDS: tick(s, ctx, now), now = the unix time it was due
		if not def.tick then return state end
		if ctx then ctx.event = nil end
		local r = def.tick(state, ctx, rawget(e, "due"))
		if r == nil then return state end
		if type(r) ~= "table" then
			error(("%s: tick returned a %s, expected a table or nothing"):format(def.file or def.name, type(r)), 0)
		end
		return r
	end
	local h = M.handler(def, e.type)
	if not h then return state end
	-- a partition a handler marked done (ctx:done) in this batch: the
	-- rest of its events are not applied
	local done = ctx and ctx._done
	if done and done[e.stream or e.partition] then return state end
	e = view(e)
	if ctx then ctx.event = e end
	local r = h(state, e, ctx)
	if r == nil then return state end
	if type(r) ~= "table" then
		local info = debug.getinfo(h, "S")
		local where = ""
		if info and info.short_src and info.linedefined and info.linedefined > 0 then
			where = info.short_src .. ":" .. info.linedefined .. ": "
		end
		error(("%shandler for '%s' returned a %s, expected a table or nothing")
			:format(where, errtext(e.type), type(r)), 0)
	end
	return r
end

-- Tables become JSON text (for jsonb columns); JSON null (e.data.x of a
-- {"x": null}) becomes nil, i.e. SQL NULL; other scalars pass through.
-- nils in the middle are kept: the count comes from select('#').
local function encode_params(method, ...)
	local n = select("#", ...)
	local args = { ... }
	for i = 1, n do
		local v = args[i]
		local tv = type(v)
		if tv == "table" then
			local ok, s = encode(v)
			if not ok then
				error(("ctx:%s: parameter %d cannot be encoded as JSON: %s")
					:format(method, i, s), 3)
			end
			args[i] = s
		elseif v == null then
			args[i] = nil
		elseif not (tv == "nil" or tv == "number" or tv == "string" or tv == "boolean") then
			error(("ctx:%s: parameter %d is a %s (expected nil, boolean, number, string or table)")
				:format(method, i, tv), 3)
		end
	end
	return args, n
end

local function failure(method, msg, code)
	local s = "ctx:" .. method .. ": " .. (msg == nil and "failed" or errtext(msg))
	if code ~= nil then s = s .. " [" .. errtext(code) .. "]" end
	return s
end

local function check_json(method, what, v)
	if v == nil then return end
	if type(v) ~= "table" then
		error(("ctx:%s: %s must be a table or nil (got %s)"):format(method, what, type(v)), 3)
	end
	local ok, err = encode(v)
	if not ok then
		error(("ctx:%s: %s cannot be encoded as JSON: %s"):format(method, what, err), 3)
	end
end

-- "name" or "schema.name" as a quoted identifier; anything else is a
-- programmer error (identifiers cannot be parameters).
local function quote_ident(method, name, what)
	if type(name) ~= "string" then
		error(("ctx:%s: %s must be a string (got %s)"):format(method, what, type(name)), 3)
	end
	local parts = {}
	for part in (name .. "."):gmatch("([^.]*)%.") do
		if not part:match("^[%a_][%w_]*$") then
			error(("ctx:%s: %s '%s' is not a plain identifier"):format(method, what, name), 3)
		end
		parts[#parts + 1] = '"' .. part .. '"'
	end
	return table.concat(parts, ".")
end

-- backend: { exec = fn(sql, ...) -> count | nil, msg, code,
--            query = fn(sql, ...) -> rows | nil, msg, code,
--            emit = fn(stream, type, data, metadata) -> version | nil, msg, code,
--            log = fn(level, msg) }
function M.new_ctx(def, backend)
	assert(type(def) == "table", "new_ctx: def must be a table")
	assert(type(backend) == "table", "new_ctx: backend must be a table")
	for _, f in ipairs({ "exec", "query", "emit", "log" }) do
		assert(type(backend[f]) == "function", "new_ctx: backend." .. f .. " must be a function")
	end

	local ctx = { projection = def.name }
	local pending, pending_order -- ctx:upsert's buffer, see below
	local flush_first

	local function check_self(self, method)
		if self ~= ctx then
			error("ctx:" .. method .. ": call it with a colon (ctx:" .. method .. "(...))", 3)
		end
	end

	function ctx.exec(self, sql, ...)
		check_self(self, "exec")
		if type(sql) ~= "string" or sql == "" then
			error("ctx:exec: sql must be a non-empty string (got " .. type(sql) .. ")", 2)
		end
		local args, n = encode_params("exec", ...)
		if pending_order[1] then flush_first() end
		local count, msg, code = backend.exec(sql, unpack(args, 1, n))
		if count == nil then error(failure("exec", msg, code), 2) end
		return count
	end

	function ctx.query(self, sql, ...)
		check_self(self, "query")
		if type(sql) ~= "string" or sql == "" then
			error("ctx:query: sql must be a non-empty string (got " .. type(sql) .. ")", 2)
		end
		local args, n = encode_params("query", ...)
		if pending_order[1] then flush_first() end
		local rows, msg, code = backend.query(sql, unpack(args, 1, n))
		if rows == nil then error(failure("query", msg, code), 2) end
		return rows
	end

	function ctx.emit(self, stream, etype, data, metadata)
		check_self(self, "emit")
		if type(stream) ~= "string" or stream == "" then
			error("ctx:emit: stream must be a non-empty string (got " .. type(stream) .. ")", 2)
		end
		if type(etype) ~= "string" or etype == "" then
			error("ctx:emit: type must be a non-empty string (got " .. type(etype) .. ")", 2)
		end
		-- Checked here, not only in the backend, so a spec fails the same
		-- way production would.
		check_json("emit", "data", data)
		check_json("emit", "metadata", metadata)
		if pending_order[1] then flush_first() end
		local version, msg, code = backend.emit(stream, etype, data, metadata)
		if version == nil then error(failure("emit", msg, code), 2) end
		return version
	end

	-- ctx:upsert(table, key, row): write a read-model row in sets. Every
	-- upsert to one key within a batch coalesces (later values win), and
	-- the batch's rows go out as ONE statement per table when the batch
	-- ends - or before the next ctx:exec/query/emit, so statements still
	-- run in the order the handlers issued them:
	--   INSERT INTO t (cols) SELECT cols FROM json_populate_recordset(NULL::t, $1)
	--   ON CONFLICT (key) DO UPDATE SET col = EXCLUDED.col, ...
	-- key is a column name or a list of them; every row for a table in one
	-- batch must have the same columns.
	pending, pending_order = {}, {}

	-- identifiers already checked, so the per-event path stays cheap
	local idents = {}
	local function ident(name, what)
		local q = idents[name]
		if not q then
			q = quote_ident("upsert", name, what)
			idents[name] = q
		end
		return q
	end

	function ctx.upsert(self, tbl, key, row)
		if self ~= ctx then check_self(self, "upsert") end
		if type(row) ~= "table" then error("ctx:upsert: row must be a table (got " .. type(row) .. ")", 2) end
		local b = pending[tbl]
		if not b then
			local qtbl = ident(tbl, "table")
			local keys = type(key) == "table" and key or { key }
			if #keys == 0 then error("ctx:upsert: key must be a column name or a list of them", 2) end
			local cols, colset = {}, {}
			for c in pairs(row) do
				ident(c, "column")
				cols[#cols + 1] = c
				colset[c] = true
			end
			table.sort(cols)
			for _, k in ipairs(keys) do
				ident(k, "key column")
				if not colset[k] then error(("ctx:upsert: row has no value for key column %s"):format(k), 2) end
			end
			b = { qtbl = qtbl, key = key, keys = keys, cols = cols, colset = colset, ncols = #cols,
				rows = {}, order = {} }
			pending[tbl] = b
			pending_order[#pending_order + 1] = tbl
		elseif key ~= b.key and (type(key) ~= "table" or table.concat(key, ",") ~= table.concat(b.keys, ",")) then
			error(("ctx:upsert: rows for %s in one batch must use the same key"):format(tbl), 2)
		end
		-- one pass checks the row and copies it (the handler may change
		-- its table afterwards; the value upserted now is what counts)
		local n, colset, copy = 0, b.colset, {}
		for c, v in pairs(row) do
			if not colset[c] then
				error(("ctx:upsert: rows for %s in one batch must have the same columns (%s is new)")
					:format(tbl, errtext(c)), 2)
			end
			local tv = type(v)
			if tv == "function" or tv == "thread" or (tv == "userdata" and v ~= null) then
				error(("ctx:upsert: column %s is a %s"):format(c, tv), 2)
			end
			copy[c] = v
			n = n + 1
		end
		if n ~= b.ncols then
			error(("ctx:upsert: rows for %s in one batch must have the same columns"):format(tbl), 2)
		end
		local k
		local keys = b.keys
		if #keys == 1 then
			k = row[keys[1]]
			if k == nil then error(("ctx:upsert: row has no value for key column %s"):format(keys[1]), 2) end
		else
			local kv = {}
			for i, kc in ipairs(keys) do
				if row[kc] == nil then error(("ctx:upsert: row has no value for key column %s"):format(kc), 2) end
				kv[i] = tostring(row[kc])
			end
			k = table.concat(kv, "\0")
		end
		local rows = b.rows
		if rows[k] == nil then b.order[#b.order + 1] = k end
		rows[k] = copy
		return true
	end

	-- ctx:done(): the partition of the event being handled is finished.
	-- Recorded here (ctx._done: stream -> the version of the event that
	-- finished it) for the backend's batch to store with the checkpoint,
	-- so it commits or rolls back with everything else of the batch; the
	-- partition's later events in the batch are not applied (M.apply).
	-- Partitioned projections only (partition = "stream"): an
	-- unpartitioned projection has no partition to finish, and finishing
	-- the whole projection is what `pause` is for.
	function ctx.done(self)
		check_self(self, "done")
		if def.partition == nil then
			error(("ctx:done: projection '%s' is not partitioned (partition = \"stream\"): "
				.. "only a partition can be done"):format(errtext(def.name)), 2)
		end
		local e = ctx.event
		if e == nil then error("ctx:done: call it in a handler (no event is being handled)", 2) end
		local done = ctx._done
		if not done then done = {}; ctx._done = done end
		local v = e.version
		if v == nil and e.timer then v = rawget(e, "_after") end
		if done[e.stream] == nil then done[e.stream] = v end
		if backend.done then backend.done(e) end
		return true
	end

	-- ctx:schedule(delay, type, data [, { at =, key = }]) and
	-- ctx:cancel(key): durable timers (the worker's is worker/timers.lua).
	-- A timer belongs to the partition of the event being handled (an
	-- unpartitioned projection's: ""), is recorded in the batch's
	-- transaction and, when due, comes back to this projection as an event
	-- with e.timer = true. Arguments are checked here, so a spec fails the
	-- same way production would.
	local function partition_of(method)
		if def.partition == nil then return "" end
		local e = ctx.event
		if e == nil then error("ctx:" .. method .. ": call it in a handler (no event is being handled)", 3) end
		return e.partition or e.stream
	end
	local function check_key(method, key)
		if type(key) ~= "string" or key == "" or #key > M.TIMER_KEY_MAX or key:find("\0", 1, true) then
			error(("ctx:%s: key must be a non-empty string of at most %d bytes without NUL (got %s)")
				:format(method, M.TIMER_KEY_MAX, type(key) == "string" and (#key .. " bytes") or type(key)), 3)
		end
	end
	local function finite(x) return type(x) == "number" and x == x and x > -math.huge and x < math.huge end

	function ctx.schedule(self, delay, ttype, data, opts)
		check_self(self, "schedule")
		if type(ttype) ~= "string" or ttype == "" or #ttype > M.TIMER_TYPE_MAX or ttype:find("\0", 1, true) then
			error(("ctx:schedule: type must be a non-empty string of at most %d bytes without NUL (got %s)")
				:format(M.TIMER_TYPE_MAX, type(ttype) == "string" and (#ttype .. " bytes") or type(ttype)), 2)
		end
		check_json("schedule", "data", data)
		local at, key
		if opts ~= nil then
			if type(opts) ~= "table" or getmetatable_raw(opts) ~= nil then
				error("ctx:schedule: options must be a plain table { at =, key = } (got " .. type(opts) .. ")", 2)
			end
			for k in next, opts do
				if k ~= "at" and k ~= "key" then
					error("ctx:schedule: unknown option " .. (type(k) == "string" and ("'" .. k .. "'") or type(k))
						.. " (known: at, key)", 2)
				end
			end
			at, key = rawget(opts, "at"), rawget(opts, "key")
			if key ~= nil then check_key("schedule", key) end
		end
		if at ~= nil then
			if delay ~= nil then error("ctx:schedule: give a delay or { at = }, not both", 2) end
			if not finite(at) or at < 0 or at > M.TIMER_AT_MAX then
				error(("ctx:schedule: at must be a unix time from 0 to %d (got %s)")
					:format(M.TIMER_AT_MAX, type(at) == "number" and tostring(at) or type(at)), 2)
			end
		elseif not finite(delay) or delay < 0 or delay > M.TIMER_DELAY_MAX then
			error(("ctx:schedule: delay must be a number of seconds from 0 to %d (got %s)")
				:format(M.TIMER_DELAY_MAX, type(delay) == "number" and tostring(delay) or type(delay)), 2)
		end
		if not M.handler(def, ttype) then
			error(("ctx:schedule: no handler for '%s' in when (nor \"*\"): the timer could never fire")
				:format(ttype), 2)
		end
		local part = partition_of("schedule")
		if not backend.schedule then error("ctx:schedule: timers are not available here", 2) end
		local ok, msg, code = backend.schedule({ partition = part, delay = delay, at = at, type = ttype,
			data = data, key = key })
		if ok == nil then error(failure("schedule", msg, code), 2) end
		return true
	end

	function ctx.cancel(self, key)
		check_self(self, "cancel")
		check_key("cancel", key)
		local part = partition_of("cancel")
		if not backend.cancel then error("ctx:cancel: timers are not available here", 2) end
		local ok, msg, code = backend.cancel(part, key)
		if ok == nil then error(failure("cancel", msg, code), 2) end
		return true
	end

	-- Forget pending upserts and partitions done (the batch rolled back,
	-- or a new one begins).
	function ctx._discard()
		pending, pending_order = {}, {}
		ctx._done = nil
	end

	-- Write pending upserts through backend.exec, one statement per table.
	-- Returns true | nil, msg, code.
	function ctx._flush()
		if #pending_order == 0 then return true end
		local order = pending_order
		local tables = pending
		pending, pending_order = {}, {}
		for _, tbl in ipairs(order) do
			local b = tables[tbl]
			local rows = {}
			for i, k in ipairs(b.order) do rows[i] = b.rows[k] end
			local qcols, sets, iskey = {}, {}, {}
			for _, k in ipairs(b.keys) do iskey[k] = true end
			for i, c in ipairs(b.cols) do
				qcols[i] = '"' .. c .. '"'
				if not iskey[c] then sets[#sets + 1] = qcols[i] .. " = EXCLUDED." .. qcols[i] end
			end
			local qkeys = {}
			for i, k in ipairs(b.keys) do qkeys[i] = '"' .. k .. '"' end
			local cl = table.concat(qcols, ", ")
			local sql = ("INSERT INTO %s (%s) SELECT %s FROM json_populate_recordset(NULL::%s, $1::json) "
				.. "ON CONFLICT (%s) DO %s"):format(b.qtbl, cl, cl, b.qtbl, table.concat(qkeys, ", "),
				#sets > 0 and ("UPDATE SET " .. table.concat(sets, ", ")) or "NOTHING")
			local ok, body = encode(rows)
			if not ok then return nil, "ctx:upsert: rows cannot be encoded as JSON: " .. body end
			-- backend.flush, when there is one, knows the write is a set
			-- of rows of several events (the worker charges a failure to
			-- the right one)
			local n, msg, code = (backend.flush or backend.exec)(sql, body)
			if n == nil then return nil, failure("upsert", msg, code), code end
		end
		return true
	end

	function flush_first()
		local ok, msg = ctx._flush()
		if not ok then error(msg, 3) end
	end

	-- Both ctx.log("x") and ctx:log("x") work: log lines are written in a
	-- hurry, and a wrong dot must not turn into a crash.
	function ctx.log(...)
		local n, first = select("#", ...), 1
		if n > 0 and (select(1, ...)) == ctx then first = 2 end
		local parts = {}
		for i = first, n do parts[#parts + 1] = tostring((select(i, ...))) end
		backend.log("info", table.concat(parts, " "))
	end

	return ctx
end

return M
