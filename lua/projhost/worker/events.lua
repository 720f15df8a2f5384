-- The events a projection reads: its read SQL (the text is projhost.reads';
-- compiled once per definition), which events and streams it sees (the
-- rule is projhost.projection's), and the lazy event made from a row of a
-- page.
local P = require "projhost.projection"
local reads = require "projhost.reads"
local S = require "projhost.worker.state"

local json = P.json
local of = S.of

local M = {}

-- Prepare the per-definition SQL once (projhost.reads has the text and
-- says why each read is an index range). (def.budget, the seconds its
-- code may run before the master kills the worker, and def.own_events come
-- resolved from the loader.)
local function compile(def)
	local rt = of(def)
	rt.read_sql, rt.read_params = reads.page_sql(def)
	-- committed events we may not read yet because an older transaction is
	-- still running somewhere in the cluster
	rt.held_sql, rt.held_params = reads.held_sql(def)
end
M.compile = compile

-- Events come from conn:events (core/bindings/lua_pg.c) as tables with the fields
-- handlers see most (position, version, stream, type); id, tx, data,
-- metadata and time stay in the page's result until first used, and data
-- and metadata stay JSON text until then, so a projection that only counts
-- events never pays for strings or JSON it does not read.
local LAZY = { id = true, tx = true, data = true, metadata = true, time = true }

-- The loader of those fields (see P.event: the event metatable is
-- projection.lua's, protected from scripts).
P.set_lazy(function(e, k)
	if not LAZY[k] then return nil end
	local page = rawget(e, "_page")
	local v = page and page:text(rawget(e, "_row"), k)
	if k == "data" or k == "metadata" then
		v = v and json.decode(v) or {}
	elseif k == "time" and v then
		-- "2026-11-22 22:55:40.123456+00" -> "2026-11-22T22:55:40.123456Z"
		v = v:gsub(" ", "T", 1):gsub("%+00$", "Z")
	end
	return v
end)

local to_event = P.event
M.to_event = to_event

-- which event types and streams a projection sees
M.visible = P.sees_type
M.stream_in_source = P.reads_stream

-- One event by its position (a parked retry), or false when it is gone.
local function load_event(position)
	local rows, err, code = S.conn:events("SELECT " .. reads.COLS .. " FROM projhost.events WHERE global_position = $1",
		position)
	if not rows then return nil, err, code end
	return rows[1] and to_event(rows[1]) or false
end
M.load_event = load_event

return M
