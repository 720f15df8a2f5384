-- projhost.testing: given/when/then for projection authors, no database.
--
--   local T = require "projhost.testing"
--   local p = T.load("projections/balances.lua")
--   p:given({ type = "Deposited", stream = "account-1", data = { amount = 10 } })
--   assert.same({ amount = 10 }, p:state("account-1"))
--
-- Events go through projhost.projection (the code the worker runs) with a
-- backend that records SQL and emitted events instead of executing them.
-- Where production differs from an in-memory run, we side with production:
--  * events are filtered by `from` and the type filter as the worker would;
--  * event data/metadata and the state are passed through JSON (the store
--    and the state column are jsonb; P.encode_state is the worker's
--    encoding), so a state that cannot be stored, or that changes when
--    stored (sparse numeric keys become strings), shows up here;
--  * a failing handler leaves no trace: its state change, SQL and emitted
--    events are dropped, then the error is raised (logs are kept);
--  * ctx:exec returns 1 (rows affected); ctx:query returns on_query stubs
--    or no rows;
--  * ctx:schedule / ctx:cancel keep pending timers (timers(); a key
--    replaces, cancel drops), fire() delivers them as the worker does
--    (e.timer = true, e.time = T.TIME), tick(now) runs an every/tick;
--  * handlers, init and caught_up run under the projection's budget
--    (options.budget, else the host's), so a handler that loops fails the
--    spec with "overran its budget of Xs" instead of hanging it.

local loader = require "projhost.loader"
local P = require "projhost.projection"
local guard = require "projhost.guard"

local M = {}

M.TIME = "2024-01-01T00:00:00.000Z"

local function deepcopy(v, seen)
	if type(v) ~= "table" then return v end
	seen = seen or {}
	if seen[v] then return seen[v] end
	local c = {}
	seen[v] = c
	for k, x in pairs(v) do c[deepcopy(k, seen)] = deepcopy(x, seen) end
	return c
end

-- Fields T.event filled in by default, so `given` may renumber them.
local defaulted = setmetatable({}, { __mode = "k" })

local function make_id(position)
	return ("00000000-0000-4000-8000-%012d"):format(position)
end

-- Build an event with defaults (version/position 1 unless given).
function M.event(t)
	if type(t) ~= "table" then error("event: expected a table", 2) end
	if type(t.type) ~= "string" or t.type == "" then
		error("event: 'type' must be a non-empty string", 2)
	end
	if type(t.stream) ~= "string" or t.stream == "" then
		error("event: 'stream' must be a non-empty string", 2)
	end
	local marks = {}
	local e = {
		type = t.type, stream = t.stream,
		data = t.data == nil and {} or t.data,
		metadata = t.metadata == nil and {} or t.metadata,
		time = t.time or M.TIME,
		version = t.version, position = t.position, id = t.id,
	}
	if e.version == nil then e.version = 1; marks.version = true end
	if e.position == nil then e.position = 1; marks.position = true end
	if e.id == nil then e.id = make_id(e.position); marks.id = true end
	defaulted[e] = marks
	return e
end

local Harness = {}
Harness.__index = Harness

-- Load a projection file; raises with the loader's message if it is bad.
function M.load(path)
	local def, err = loader.load_file(path)
	if not def then error(err, 0) end
	return M.new(def)
end

-- Same, from source text (handy for small inline projections in specs).
function M.load_source(source, path)
	local def, err = loader.load_source(source, path or "inline.lua")
	if not def then error(err, 0) end
	return M.new(def)
end

-- A harness over an already-loaded def.
function M.new(def)
	local self = setmetatable({ def = def, _stubs = {}, _fails = {} }, Harness)
	self:reset()
	return self
end

-- Forget state, SQL, emitted events, logs and event numbering; stubs stay.
function Harness:reset()
	self._states = {}     -- partition key ("" when unpartitioned) -> JSON text
	self._sql = {}
	self._emitted = {}
	self._logs = {}
	self._versions = {}   -- stream -> last version
	self._position = 0
	self._timers = {}     -- pending: { partition, type, data, key, delay | at }
	return self
end

-- ctx:query whose SQL matches `pattern` (a Lua pattern) returns `rows`, or
-- rows(sql, ...) if it is a function.  The latest matching stub wins.
function Harness:on_query(pattern, rows)
	if type(pattern) ~= "string" then error("on_query: pattern must be a string", 2) end
	table.insert(self._stubs, 1, { pattern = pattern, rows = rows or {} })
	return self
end

-- A matching exec/query returns nil, msg, code (so ctx raises).
function Harness:fail_sql(pattern, msg, code)
	if type(pattern) ~= "string" then error("fail_sql: pattern must be a string", 2) end
	table.insert(self._fails, 1, { pattern = pattern, msg = msg or "stubbed failure", code = code })
	return self
end

function Harness:_backend()
	local function record(sql, ...)
		self._sql[#self._sql + 1] = { sql = sql, params = { ... }, n = select("#", ...) }
		for _, f in ipairs(self._fails) do
			if sql:match(f.pattern) then return f end
		end
	end
	return {
		exec = function(sql, ...)
			local f = record(sql, ...)
			if f then return nil, f.msg, f.code end
			return 1
		end,
		query = function(sql, ...)
			local f = record(sql, ...)
			if f then return nil, f.msg, f.code end
			for _, s in ipairs(self._stubs) do
				if sql:match(s.pattern) then
					if type(s.rows) == "function" then return s.rows(sql, ...) end
					return deepcopy(s.rows)
				end
			end
			return {}
		end,
		emit = function(stream, etype, data, metadata)
			local v = (self._versions[stream] or 0) + 1
			self._versions[stream] = v
			self._emitted[#self._emitted + 1] = {
				stream = stream, type = etype,
				data = deepcopy(data), metadata = deepcopy(metadata),
			}
			return v
		end,
		log = function(_, msg)
			self._logs[#self._logs + 1] = msg
		end,
		schedule = function(t)
			local c = deepcopy(t)
			c.data = c.data and P.json.decode(P.json.encode(c.data)) or {}
			local list = self._timers
			for i = #list, 1, -1 do
				if t.key ~= nil and list[i].key == t.key and list[i].partition == t.partition then
					table.remove(list, i)
				end
			end
			list[#list + 1] = c
			return true
		end,
		cancel = function(part, key)
			local list = self._timers
			for i = #list, 1, -1 do
				if list[i].key == key and list[i].partition == part then table.remove(list, i) end
			end
			return true
		end,
	}
end

-- What a failure must undo (logs stay: production logs are not
-- transactional either, and they help to find the failure).
function Harness:_mark()
	local versions = {}
	for k, v in pairs(self._versions) do versions[k] = v end
	return { sql = #self._sql, emitted = #self._emitted, versions = versions, timers = deepcopy(self._timers) }
end

function Harness:_rollback(mark)
	for i = #self._sql, mark.sql + 1, -1 do self._sql[i] = nil end
	for i = #self._emitted, mark.emitted + 1, -1 do self._emitted[i] = nil end
	self._versions = mark.versions
	self._timers = mark.timers
end

-- Run fn under the projection's budget with the sandbox's print captured
-- into logs: true, result | false, message (a string, see guard.call).
function Harness:_run(fn, ...)
	local saved = loader.log_fn
	loader.log_fn = function(_, msg, path) self._logs[#self._logs + 1] = path .. ": " .. msg end
	local ok, res = guard.call(self.def.budget or loader.default_budget, fn, ...)
	loader.log_fn = saved
	return ok, res
end

function Harness:_sees(e)
	return P.sees(self.def, e.stream, e.type)
end

-- Fill in numbering the way the store would: version per stream, position
-- global.  Explicit values are kept and move the counters forward.
function Harness:_number(t)
	local marks = defaulted[t] or {}
	local e = M.event(t)
	local pos = (not marks.position and t.position) or self._position + 1
	if pos > self._position then self._position = pos end
	local last = self._versions[e.stream] or 0
	local ver = (not marks.version and t.version) or last + 1
	if ver > last then self._versions[e.stream] = ver end
	e.position, e.version = pos, ver
	if marks.id or t.id == nil then e.id = make_id(pos) end
	-- Handlers see what the store would hand back: decoded JSON, and a
	-- copy, so they cannot change the spec's tables.
	e.data = P.json.decode(P.json.encode(e.data))
	e.metadata = P.json.decode(P.json.encode(e.metadata))
	return e
end

local function describe_event(def, e)
	return ("%s: event %s@%s (%s)"):format(def.name, e.stream, tostring(e.version), e.type)
end

function Harness:_apply(e)
	local def = self.def
	local key = def.partition == "stream" and e.stream or ""
	local json = self._states[key]
	local mark = self:_mark()
	local ctx = P.new_ctx(def, self:_backend())

	local ok, res = self:_run(function()
		local state = json and P.decode_state(json) or P.init_state(def)
		return P.apply(def, state, e, ctx)
	end)
	if ok then
		-- ctx:upsert writes at the end of a batch; here every event is one
		local okf, ferr = ctx._flush()
		if not okf then ok, res = false, ferr end
	end
	local encoded
	if ok then
		local s, msg = P.encode_state(res)
		if s then encoded = s else ok, res = false, msg end
	end
	if not ok then
		self:_rollback(mark)
		error(describe_event(def, e) .. ": " .. guard.errtext(res), 0)
	end
	self._states[key] = encoded
end

-- Apply events: given(e1, e2, ...) or given({ e1, e2, ... }).
function Harness:given(...)
	local events = { ... }
	local first = events[1]
	if select("#", ...) == 1 and type(first) == "table" and first.type == nil
		and type(first[1]) == "table" then
		events = first
	end
	for i, t in ipairs(events) do
		if type(t) ~= "table" or type(t.type) ~= "string" or t.type == ""
			or type(t.stream) ~= "string" or t.stream == "" then
			error(("given: event #%d needs a non-empty 'type' and 'stream'"):format(i), 2)
		end
	end
	for _, t in ipairs(events) do
		local e = self:_number(t)
		if self:_sees(e) then self:_apply(e) end
	end
	return self
end

-- The current state (a copy).  For partition = "stream", pass the stream;
-- a stream the projection never handled an event of gives nil.
function Harness:state(partition)
	if self.def.partition == "stream" then
		if type(partition) ~= "string" then
			error(("state: %s is partitioned by stream; call state(\"<stream>\")")
				:format(self.def.name), 2)
		end
		local json = self._states[partition]
		return json and P.decode_state(json) or nil
	end
	if partition ~= nil then
		error(("state: %s is not partitioned; call state() without arguments")
			:format(self.def.name), 2)
	end
	local json = self._states[""]
	if json then return P.decode_state(json) end
	local ok, s = self:_run(P.init_state, self.def)
	if not ok then error(self.def.name .. ": init: " .. s, 0) end
	return deepcopy(s)
end

-- Every ctx:exec and ctx:query so far: { sql =, params =, n = }, in order.
-- Table parameters appear as the JSON text the database would receive.
function Harness:sql()
	return deepcopy(self._sql)
end

function Harness:emitted()
	return deepcopy(self._emitted)
end

function Harness:logs()
	return deepcopy(self._logs)
end

-- The pending timers (copies), in the order they were scheduled.
function Harness:timers()
	return deepcopy(self._timers)
end

-- Deliver every pending timer (in the order scheduled) as the worker
-- does: to its partition's handler for its type (or "*"), e.timer = true,
-- e.time = T.TIME. Timers its handlers schedule stay pending.
function Harness:fire()
	local list = self._timers
	self._timers = {}
	for _, t in ipairs(list) do
		self:_apply({ timer = true, type = t.type, key = t.key, data = t.data, partition = t.partition,
			stream = t.partition ~= "" and t.partition or nil, time = M.TIME })
	end
	return self
end

-- Run an every = SECONDS projection's tick(s, ctx, now) once.
function Harness:tick(now)
	if not self.def.tick then error(self.def.name .. ": has no tick (every = SECONDS)", 2) end
	self:_apply({ timer = true, tick = true, type = "tick", partition = "", due = now or 0, time = M.TIME })
	return self
end

-- Run the caught_up hook (if any) with a recording ctx.
function Harness:caught_up()
	local def = self.def
	if not def.caught_up then return self end
	local mark = self:_mark()
	local ctx = P.new_ctx(def, self:_backend())
	local ok, err = self:_run(def.caught_up, ctx)
	if not ok then
		self:_rollback(mark)
		error(def.name .. ": caught_up: " .. err, 0)
	end
	return self
end

return M
