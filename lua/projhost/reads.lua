-- projhost.reads: the SQL of every read the worker makes of the event store
-- (issue 11): a page of an unpartitioned projection, the "held back" probe,
-- a job's partitions, and partition discovery. One home for the text, so
-- the worker runs and spec/integration/plans_spec.lua explains the same
-- statements.
--
-- Every read is an index range walked in the order it is consumed, whatever
-- the statistics say (a store imported in bulk is read before autovacuum
-- analyzed it), so a page costs the rows it returns plus the rows of other
-- sources interleaved in the range it walks - never the events after it:
--
--   all        events (transaction_id, global_position)
--   category   events (split_part(stream_id, '-', 1), transaction_id,
--              global_position): the category index (schema.INDEXES)
--   stream     the category index of the stream's category, stream_id as a
--              filter: it walks the events of the other streams of that
--              category (a third index on every append would cost every
--              store; a stream is a category's part by definition)
--   partition  events (stream_id, stream_version), the unique key, from the
--              checkpoint's version (see PARTS_SQL); new partitions caught
--              up by discovery: the same key, a range of it or a descent
--              per stream in one scan (see catchup_sql)
--   discovery  projhost.streams' primary key (a walk, see walk_sql), or
--              the page's own range over the events since the last pass
--              (see window_sql)
--
-- Which index: a category's reads are ordered by the category index's
-- whole key, which only that index gives without a sort (see
-- source_terms). Which plan: filters - `event_type = ANY(...)`, and a
-- category without statistics - make it expect fewer rows than a page, and
-- then a bitmap or sequential scan plus a sort of everything after the
-- checkpoint looks cheaper than walking the index - for every page, which
-- makes a catch-up quadratic
-- (measured: a category of 100,000 events in a store of 1,000,000 just
-- loaded, one upsert per event: 39 s; walking the index: 2.1 s). So every
-- read here runs with the alternatives priced out: PLANNER_SQL sets
-- enable_seqscan, enable_bitmapscan and enable_sort off for the transaction
-- (set_config(..., true)) just before the reads, and the worker sets them
-- back (RESTORE_SQL) before the first handler statement - and before its
-- own other statements: under these settings a lock query's ORDER BY over
-- `partition = ANY(...)` walked every checkpoint row. Custom and generic
-- plans alike: the settings hold while a statement is planned, whichever
-- plan it gets.
local core = require "projhost.core"

local M = {}

-- created_at comes as the server prints it (UTC, see the worker's session)
-- and is turned into ISO 8601 only when a handler reads e.time.
M.COLS = [[global_position, transaction_id::text AS tx, event_id, stream_id,
	stream_version, event_type, data::text AS data, metadata::text AS metadata, created_at]]

--- How the binding makes events of those columns (conn:event_fields, once
--- per connection): the fields handlers see most are copied into each
--- event table; id, tx, data, metadata and time stay in the page until a
--- handler first reads them (see projhost.projection's lazy events), so a
--- projection that only counts events never pays for strings it does not
--- read; `last` says where a page ends (page:last()).
M.EVENT_FIELDS = {
	eager = {
		{ "global_position", "position", number = true },
		{ "stream_version", "version", number = true },
		{ "stream_id", "stream" },
		{ "event_type", "type" },
	},
	lazy = {
		{ "event_id", "id" }, { "tx", "tx" }, { "data", "data" },
		{ "metadata", "metadata" }, { "created_at", "time" },
	},
	last = { "tx", "global_position" },
}

-- The settings a read runs under, and their names (the worker reads their
-- session values once per connection to set them back). No parallel
-- workers either: a page of the discovery walk (5,000 streams, 30 ms) was
-- planned as a Gather Merge, and starting its two workers cost a third of
-- the page (1,000,000 streams: 2.4 s a walk).
M.PLANNER = { "enable_seqscan", "enable_bitmapscan", "enable_sort", "max_parallel_workers_per_gather" }
local PLANNER_VALUE = { max_parallel_workers_per_gather = "0" }

local function planner_sql()
	local on, back, now = {}, {}, {}
	for i, name in ipairs(M.PLANNER) do
		on[i] = ("set_config('%s', '%s', true)"):format(name, PLANNER_VALUE[name] or "off")
		back[i] = ("set_config('%s', $%d, true)"):format(name, i)
		now[i] = ("current_setting('%s') AS %s"):format(name, name)
	end
	return "SELECT " .. table.concat(on, ", "), "SELECT " .. table.concat(back, ", "),
		"SELECT " .. table.concat(now, ", ")
end

--- PLANNER_SQL: price the alternatives out, for this transaction.
--- RESTORE_SQL: set them back; parameters = the session values in
--- M.PLANNER order, read with SESSION_SQL when the connection opens.
M.PLANNER_SQL, M.RESTORE_SQL, M.SESSION_SQL = planner_sql()

--- A PostgreSQL text[] literal of a Lua list (false = NULL).
M.pg_text_array = core.text_array

--- A stream's category: the part before its first '-', all of it without
--- one - what split_part(stream_id, '-', 1) computes on the server.
function M.category(stream)
	return (stream:match("^[^-]*"))
end

-- The index terms of def's source (table alias `a`, parameters from
-- `first`): SQL text joined with AND, and their parameters.
--
-- A category is `= ANY(ARRAY[$n])`, not `= $n`, and its reads are ordered
-- by the category index's whole key (see order_of): an equality with a
-- value makes the planner drop the category from the ORDER BY, and then
-- the store's (transaction_id, global_position) index gives the same
-- order - a walk of every category, filtered - and it took that whenever
-- its estimate was as low: always on a store imported in one transaction
-- (a row comparison's selectivity is its first column's, and no event is
-- past the import's transaction). Measured on 3,000,000 events, a page of
-- a 1% category walked 100,000 events; with a types filter matching none
-- of them, the whole store. An array term is no equivalence, so the key
-- stays in the ORDER BY, only the category index gives that order without
-- a sort, and a sort is priced out (PLANNER_SQL): the category's own
-- range, whatever the estimates, custom or generic plan. (A btree walks an
-- array's values in order, one range each: one value, one range.)
local function source_terms(def, a, first, sql, params)
	local n = first
	if def.from.stream then
		-- the category term lets the category index serve the range
		sql[#sql + 1] = ("split_part(%sstream_id, '-', 1) = ANY(ARRAY[$%d]) AND %sstream_id = $%d"):format(
			a, n, a, n + 1)
		params[#params + 1] = M.category(def.from.stream)
		params[#params + 1] = def.from.stream
		n = n + 2
	elseif def.from.category then
		sql[#sql + 1] = ("split_part(%sstream_id, '-', 1) = ANY(ARRAY[$%d])"):format(a, n)
		params[#params + 1] = def.from.category
		n = n + 1
	end
	return n
end

-- The ORDER BY of a read of def's source along (transaction_id[,
-- global_position]) (alias `a`): the key of the index it walks, see
-- source_terms.
local function order_of(def, a, cols)
	local key = {}
	if def.from.stream or def.from.category then key[1] = ("split_part(%sstream_id, '-', 1)"):format(a) end
	for _, c in ipairs(cols) do key[#key + 1] = a .. c end
	return "ORDER BY " .. table.concat(key, ", ")
end

-- def's whole filter for pages and the probe: source, event types and its
-- own emitted events, as " AND ..." text plus its parameters.
local function page_filter(def, first)
	local sql, params = {}, {}
	local n = source_terms(def, "", first, sql, params)
	if def.type_filter then
		sql[#sql + 1] = "event_type = ANY($" .. n .. "::text[])"
		params[#params + 1] = M.pg_text_array(def.type_filter)
		n = n + 1
	end
	if not def.own_events then
		-- the events it emitted itself (ctx:emit marks them, "name" or
		-- "name@version" in a shadow): a projection that emits what it
		-- reads cannot feed itself for ever
		sql[#sql + 1] = "split_part(metadata->>'projection', '@', 1) IS DISTINCT FROM $" .. n
		params[#params + 1] = def.name
	end
	local s = table.concat(sql, " AND ")
	return s ~= "" and (" AND " .. s) or "", params
end

--- The next page of an unpartitioned projection: $1 xid8 and $2 position
--- of the checkpoint, $3 the page size, then the returned parameters.
--- Events below the xmin horizon only (design §2: gap-free).
function M.page_sql(def)
	local f, fp = page_filter(def, 4)
	return "SELECT " .. M.COLS .. [[
	FROM projhost.events
	WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
	  AND (transaction_id, global_position) > ($1::xid8, $2::bigint)]] .. f .. [[
	]] .. order_of(def, "", { "transaction_id", "global_position" }) .. [[
	LIMIT $3]], fp
end

--- Whether committed events of def's source wait above the horizon (an
--- older transaction is still running somewhere). ORDER BY makes it the
--- first entry of the index range from the horizon; without it, a store
--- with no statistics got a sequential scan of the table (0.7 s a batch at
--- 3,000,000 events).
function M.held_sql(def)
	local f, fp = page_filter(def, 1)
	return [[SELECT 1 AS held FROM projhost.events
	WHERE transaction_id >= pg_snapshot_xmin(pg_current_snapshot())]] .. f .. [[
	]] .. order_of(def, "", { "transaction_id" }) .. [[ LIMIT 1]], fp
end

--- A job's partitions in one statement: each one's checkpoint row locked
--- and its stream read past it (a dense range of the unique key). $1
--- projection, $2 text[] partitions, $3 events per partition, $4 mark own
--- events, $5 the projection's name. Types are left to the worker (an
--- index range per stream is as short as it gets).
---
--- Rows: at least one per partition (the events' LEFT JOIN: a partition
--- with nothing to read has one row without an event), partition after
--- partition in $2's order, each in version order (a LATERAL subquery runs
--- per partition, in its own order): no ORDER BY over them, which would
--- sort every event of the job. Besides the events' columns:
---   _pos     the checkpoint's version, on every row of a partition whose
---            row this statement locked (FOR UPDATE SKIP LOCKED)
---   _state   its state, on the row of the version after it (the only one
---            the worker takes a state from: a partition whose first event
---            is not that one applies nothing)
---   _status  its status unless running (then no events are read)
---   _held    1: the row exists, but another worker or instance holds it
---            (not locked, no events read)
--- and a partition with none of _pos and _held has no row: it is read from
--- its start (see the worker's open_parts for what a row made meanwhile
--- does).
---
--- Each checkpoint is looked up once (the one index descent a new
--- partition costs, where a lock query and then a lookup by the read cost
--- two: 1,000,000 new partitions of a catch-up): a scalar subquery, a
--- primary-key lookup per partition whatever the statistics say (a join
--- may be planned as a hash over every checkpoint row), made once (OFFSET
--- 0). Only a row it found is locked, by its ctid (a TID scan, no second
--- descent); a row updated and committed meanwhile is followed to its
--- latest version by the lock (READ COMMITTED rechecks it; the key
--- conditions stay in the filter for that recheck), one deleted meanwhile
--- is not locked (held). Run under PLANNER_SQL: with few events per
--- stream, a bitmap scan and a sort of all of a stream's events after the
--- checkpoint looks cheaper than its range.
M.PARTS_SQL = [[SELECT w.p AS partition, e.global_position, e.tx, e.event_id, e.stream_id,
		e.stream_version, e.event_type, e.data, e.metadata, e.created_at,
		CASE WHEN $4 AND e.origin = $5 THEN 1 END AS _own,
		l.last_pos AS _pos,
		CASE WHEN e.stream_version = l.last_pos + 1 THEN l.state::text END AS _state,
		CASE WHEN l.status <> 'running' THEN l.status END AS _status,
		CASE WHEN k.tid IS NOT NULL AND l.last_pos IS NULL THEN 1 END AS _held
	FROM unnest($2::text[]) AS w(p)
	CROSS JOIN LATERAL (SELECT (SELECT c.ctid FROM projhost.checkpoints c
		WHERE c.projection = $1 AND c.partition = w.p) AS tid OFFSET 0) k
	LEFT JOIN LATERAL (SELECT c.last_pos, c.status, c.state FROM projhost.checkpoints c
		WHERE c.ctid = k.tid AND c.projection = $1 AND c.partition = w.p
		FOR UPDATE SKIP LOCKED) l ON true
	LEFT JOIN LATERAL (
		SELECT ]] .. M.COLS .. [[, split_part(ev.metadata->>'projection', '@', 1) AS origin
		FROM projhost.events ev
		WHERE (k.tid IS NULL OR l.status = 'running')
		  AND ev.stream_id = w.p AND ev.stream_version > coalesce(l.last_pos, 0)
		ORDER BY ev.stream_version LIMIT $3) e ON true]]

--- The events of new partitions (no checkpoint row: worker/catchup.lua),
--- each stream from its start, partition after partition in key order and
--- each in version order: one walk of the unique key (stream_id,
--- stream_version) instead of a lookup of a checkpoint and a descent per
--- partition (PARTS_SQL). $1 mark own events, $2 the projection's name,
--- then either (list) $3 text[] streams - a descent per stream inside one
--- index scan - or (range) $3 and $4 the first and the last stream: the
--- range of the key between them, when every stream in it is one of the
--- job's (a walk's page of new streams and nothing else); events of a
--- stream that is not one of them (made since) are left to the worker.
--- Columns: PARTS_SQL's events' (partition, COLS, _own). No lock: two
--- workers or instances that both take a partition as new cannot both
--- commit it (the INSERT of its row decides, see worker/parts.lua).
function M.catchup_sql(range)
	return [[SELECT ev.stream_id AS partition, ]] .. M.COLS .. [[,
		CASE WHEN $1 AND split_part(ev.metadata->>'projection', '@', 1) = $2 THEN 1 END AS _own
	FROM projhost.events ev
	WHERE ]] .. (range and "ev.stream_id >= $3 AND ev.stream_id <= $4" or "ev.stream_id = ANY($3::text[])") .. [[
	ORDER BY ev.stream_id, ev.stream_version]]
end

-- A checkpoint row `c` as behind() reads it: its version when running,
-- else past any version (one that is not running is never behind: an
-- operator wakes it); no row (NULL) is version 0.
local function checkpoint_value(c)
	return ("CASE WHEN %s.status = 'running' THEN %s.last_pos ELSE 9223372036854775807 END"):format(c, c)
end

-- The checkpoint of stream `a`.stream_id ($1 projection), looked up.
local function checkpoint_of(a)
	return "(SELECT " .. checkpoint_value("c") .. [[
	FROM projhost.checkpoints c WHERE c.projection = $1 AND c.partition = ]] .. a .. ".stream_id)"
end

-- "is a stream at version `version` past its checkpoint `cp`" (SQL of
-- checkpoint_of)
local function behind_of(version, cp)
	return version .. " > coalesce(" .. cp .. ", 0)"
end

-- "is stream `a`.stream_id at `a`.version past its checkpoint"
local function behind(a)
	return behind_of(a .. ".version", checkpoint_of(a))
end

--- A page of the walk over def's streams in key order: $1 projection, $2
--- the stream after which to go on, $3 streams per page. Rows: the streams
--- behind in key order (the database's collation: a run of them is a key
--- range, see worker/catchup.lua), with their version and `fresh` (true:
--- no checkpoint row, see worker/catchup.lua), then one row without a
--- stream: `last`, the last stream walked, and `n`, how many were. A page
--- costs the streams it walks and the checkpoints of the same key range:
--- one range of each primary key, hashed and joined (a lookup per stream
--- cost twice as much, 1,000,000 streams: 5 s a walk; if the planner
--- prefers that, it is still an index range per stream).
function M.walk_sql(def)
	local filter, params = "", {}
	if def.from.stream then
		filter = " AND s.stream_id = $4"
		params[1] = def.from.stream
	elseif def.from.category then
		-- a range of streams_category_idx (schema.INDEXES), in any
		-- collation: a key range of "C" to "C." holds the category only
		-- where '-' sorts as itself (C, not en_US.UTF-8 or ICU's
		-- alternate=shifted, which ignore it: 'C.' < 'C-1' - a walk that
		-- found none of the category's streams)
		filter = " AND split_part(s.stream_id, '-', 1) = $4"
		params[1] = def.from.category
	end
	return [[WITH w AS MATERIALIZED (
		SELECT s.stream_id, s.version
		FROM projhost.streams s
		WHERE s.stream_id > $2]] .. filter .. [[
		ORDER BY s.stream_id LIMIT $3),
	c AS (
		SELECT c.partition, ]] .. checkpoint_value("c") .. [[ AS cp
		FROM projhost.checkpoints c
		WHERE c.projection = $1 AND c.partition > $2 AND c.partition <= (SELECT max(stream_id) FROM w))
	SELECT * FROM (
		SELECT w.stream_id, w.version, c.cp IS NULL AS fresh, NULL AS last, NULL::bigint AS n
		FROM w LEFT JOIN c ON c.partition = w.stream_id
		WHERE ]] .. behind_of("w.version", "c.cp") .. [[
		ORDER BY w.stream_id) behind
	UNION ALL
	SELECT NULL, NULL, NULL, max(stream_id), count(*) FROM w]], params
end

--- The streams of def's source that got events since the last pass: the
--- window of events (transaction_id, global_position) > ($2, $3) below the
--- horizon, $4 events at most, walked like a page (same index range, all
--- conditions in the index). A stream is behind when its last event in the
--- window is past its checkpoint: the events alone decide, in the snapshot
--- that read them (the streams table may be written by another transaction
--- when events are imported with plain SQL). Rows: each stream of the
--- window that is behind with the first of its events in the window (tx, pos), in window
--- order; then, unless the window is empty, one row without a stream: the
--- window's last event (tx, pos) and `n`, its size.
function M.window_sql(def)
	local terms, params = {}, {}
	source_terms(def, "e.", 5, terms, params)
	local f = #terms > 0 and (" AND " .. table.concat(terms, " AND ")) or ""
	return [[WITH w AS MATERIALIZED (
		SELECT e.stream_id, e.stream_version AS version, e.transaction_id AS tx, e.global_position AS pos
		FROM projhost.events e
		WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
		  AND (e.transaction_id, e.global_position) > ($2::xid8, $3::bigint)]] .. f .. [[
		]] .. order_of(def, "e.", { "transaction_id", "global_position" }) .. [[ LIMIT $4),
	f AS (SELECT DISTINCT ON (stream_id) stream_id, tx, pos,
			max(version) OVER (PARTITION BY stream_id) AS version
		FROM w ORDER BY stream_id, tx, pos)
	SELECT * FROM (
		SELECT f.stream_id, f.tx::text AS tx, f.pos, NULL::bigint AS n FROM f
		WHERE ]] .. behind("f") .. [[
		ORDER BY f.tx, f.pos) behind
	UNION ALL
	SELECT * FROM (SELECT NULL, tx::text, pos, count(*) OVER () FROM w ORDER BY tx DESC, pos DESC LIMIT 1) tail]], params
end

return M
