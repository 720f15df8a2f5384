-- Every read the worker makes is an index range in the order it is
-- consumed, whatever the statistics say (issue 11): on a store loaded in
-- bulk and never analyzed, and again after ANALYZE, with the source 100%,
-- 10% and 0.1% of the store, with and without a types filter - for pages,
-- the "held back" probe, discovery (walks and windows) and partition reads,
-- each along the index its source names (a category's own, not the store's
-- (transaction_id, global_position) past every other category); and the
-- status functions' reads of a category's events.
-- The statements and the settings are projhost.reads', the ones the worker
-- runs, under the same planner settings; plans are checked custom (values
-- known) and generic.
local h = require "helpers"
local cjson = require "cjson"
local reads = require "projhost.reads"
local schema = require "projhost.schema"

local N = 100000

local conn

-- A definition as the loader makes it, for the parts reads looks at.
local function def(from, types, partition)
	return { name = "p", cp = "p", from = from, type_filter = types, own_events = false,
		partition = partition }
end

local SOURCES = {
	{ "all (100%)", { all = true } },
	{ "category of 10%", { category = "ten" } },
	{ "category of 0.1%", { category = "tiny" } },
	{ "category of 89.9%", { category = "big" } },
	{ "stream", { stream = "ten-1" } },
	{ "a category that has no events", { category = "none" } },
}

local function quote(v)
	if type(v) == "number" then return tostring(v) end
	return "'" .. tostring(v):gsub("'", "''") .. "'"
end

-- Every node of a plan (JSON), with the path of node types above it.
local function walk(node, above, out)
	out[#out + 1] = { node = node, above = above }
	local path = {}
	for i, t in ipairs(above) do path[i] = t end
	path[#path + 1] = node
	for _, child in ipairs(node.Plans or {}) do walk(child, path, out) end
	return out
end

local BAD_SCAN = { ["Seq Scan"] = true, ["Bitmap Heap Scan"] = true, ["Parallel Seq Scan"] = true,
	["Parallel Bitmap Heap Scan"] = true }

-- The index each kind of read walks (see projhost.reads)
local TX_IDX, CAT_IDX, KEY_IDX = "events_transaction_id_global_position_idx", "events_category_idx",
	"events_stream_id_stream_version_key"

-- The reasons plan text is not made of index ranges over the event store:
-- scans that are not index ranges, sorts over the events, and an index of
-- the events other than `index` (a category read along the store's
-- (transaction_id, global_position) walks every other category too), and
-- for a keyset read an index condition without the checkpoint's row
-- comparison (the range would start before the checkpoint).
local KEYSET = "ROW%([%w_.]*transaction_id, [%w_.]*global_position%) >"
local function problems(plan_json, index, keyset)
	local plan = cjson.decode(plan_json)[1].Plan
	local bad = {}
	for _, n in ipairs(walk(plan, {}, {})) do
		local t, rel = n.node["Node Type"], n.node["Relation Name"]
		if BAD_SCAN[t] and (rel == "events" or rel == "streams") then
			bad[#bad + 1] = t .. " on " .. rel
		end
		if rel == "events" and index and n.node["Index Name"] ~= index then
			bad[#bad + 1] = t .. " using " .. tostring(n.node["Index Name"]) .. ", not " .. index
		end
		if rel == "events" and keyset and not (n.node["Index Cond"] or ""):find(KEYSET) then
			bad[#bad + 1] = "the checkpoint is no index condition: " .. tostring(n.node["Index Cond"])
		end
		if rel == "events" then
			for _, up in ipairs(n.above) do
				if up["Node Type"] == "Sort" or up["Node Type"] == "Incremental Sort" then
					bad[#bad + 1] = up["Node Type"] .. " over the events"
				end
			end
		end
	end
	return bad
end

local function explain(sql, params, generic, planner)
	assert(conn:exec("BEGIN"))
	if planner then assert(conn:exec(reads.PLANNER_SQL)) end
	local rows, err
	if generic then
		assert(conn:exec("SET LOCAL plan_cache_mode = force_generic_plan"))
		assert(conn:exec("PREPARE plan_spec AS " .. sql))
		local vals = {}
		for i, v in ipairs(params) do vals[i] = quote(v) end
		rows, err = conn:query("EXPLAIN (FORMAT JSON) EXECUTE plan_spec(" .. table.concat(vals, ", ") .. ")")
		conn:exec("ROLLBACK")
		assert(conn:exec("DEALLOCATE plan_spec"))
		assert(rows, err)
		return rows[1]["QUERY PLAN"]
	else
		rows, err = conn:query("EXPLAIN (FORMAT JSON) " .. sql, unpack(params))
	end
	assert(conn:exec("ROLLBACK"))
	assert(rows, err)
	return rows[1]["QUERY PLAN"]
end

local function check(what, sql, params, planner, index, keyset)
	for _, generic in ipairs({ false, true }) do
		local text = explain(sql, params, generic, planner)
		local bad = problems(text, index, keyset)
		assert.same({}, bad, ("%s (%s plan):\n%s"):format(what, generic and "generic" or "custom", text))
	end
end

local function concat(a, b)
	local out = {}
	for _, v in ipairs(a) do out[#out + 1] = v end
	for _, v in ipairs(b) do out[#out + 1] = v end
	return out
end

local function all_reads(stage)
	-- a checkpoint at the start and one in the middle of the store
	local mid = assert(conn:query([[SELECT transaction_id::text AS tx, global_position AS pos
		FROM projhost.events ORDER BY global_position OFFSET $1 LIMIT 1]], math.floor(N / 2)))[1]
	local starts = { { "0", 0 }, { mid.tx, tonumber(mid.pos) } }
	for _, src in ipairs(SOURCES) do
		local index = src[2].all and TX_IDX or CAT_IDX
		for _, types in ipairs({ false, { "Rare" } }) do
			local d = def(src[2], types or nil)
			local label = ("%s, %s%s"):format(stage, src[1], types and ", types" or "")
			local sql, fp = reads.page_sql(d)
			for _, st in ipairs(starts) do
				check(label .. ": page from " .. st[1], sql, concat({ st[1], st[2], 1000 }, fp), true, index, true)
			end
			sql, fp = reads.held_sql(d)
			check(label .. ": held-back probe", sql, fp, true, index)
		end
		if not src[2].all then
			-- discovery and partition reads of a partitioned projection
			local d = def(src[2], nil, "stream")
			local sql, fp = reads.walk_sql(d)
			check(stage .. ", " .. src[1] .. ": discovery walk", sql, concat({ "p", "", 5000 }, fp), true)
			sql, fp = reads.window_sql(d)
			for _, st in ipairs(starts) do
				check(stage .. ", " .. src[1] .. ": discovery window", sql,
					concat({ "p", st[1], st[2], 5000 }, fp), true, index, true)
			end
		end
	end
	check(stage .. ": partition reads", reads.PARTS_SQL,
		{ "p", reads.pg_text_array({ "ten-1", "tiny-7", "big-2" }), 1000, true, "p" }, true, KEY_IDX)
	-- new partitions caught up by discovery (worker/catchup.lua)
	check(stage .. ": new partitions, a list", reads.catchup_sql(false),
		{ true, "p", reads.pg_text_array({ "big-2", "ten-1", "tiny-7" }) }, true, KEY_IDX)
	check(stage .. ": new partitions, a range", reads.catchup_sql(true), { true, "p", "big-2", "big-20" }, true,
		KEY_IDX)
end

describe("every read is an index range", function()
	setup(function()
		conn = h.connect(h.fresh_db())
		assert(schema.migrate(conn))
		-- the shape of a store just imported: never analyzed, and
		-- autovacuum kept from analyzing it while the spec runs
		assert(conn:exec("ALTER TABLE projhost.events SET (autovacuum_enabled = false)"))
		assert(conn:exec("ALTER TABLE projhost.streams SET (autovacuum_enabled = false)"))
		assert(conn:exec("ALTER TABLE projhost.checkpoints SET (autovacuum_enabled = false)"))
		-- 0.1% tiny, 0.9% one, 9% ten... categories by i mod 1000; 1% Rare
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			SELECT CASE WHEN i % 1000 = 7 THEN 'tiny' WHEN i % 10 = 1 THEN 'ten' ELSE 'big' END
				|| '-' || (i % 1000), i / 1000 + 1,
				CASE WHEN i % 100 = 5 THEN 'Rare' ELSE 'Inc' END, jsonb_build_object('n', i)
			FROM generate_series(0, $1 - 1) i]], N))
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			SELECT stream_id, max(stream_version), max(global_position) FROM projhost.events GROUP BY 1]]))
		assert(conn:exec([[INSERT INTO projhost.checkpoints (projection, partition, version)
			SELECT 'p', stream_id, 1 FROM projhost.streams WHERE stream_id LIKE 'ten-%']]))
		assert(conn:exec("INSERT INTO projhost.checkpoints (projection, partition, version) VALUES ('p', '', 1)"))
	end)
	teardown(function() if conn then conn:close() end end)

	it("the store is the shape the spec means", function()
		assert.equal(-1, tonumber(h.scalar(conn,
			"SELECT reltuples FROM pg_class WHERE oid = 'projhost.events'::regclass")))
		assert.equal(N / 10, tonumber(h.scalar(conn,
			"SELECT count(*) FROM projhost.events WHERE split_part(stream_id, '-', 1) = 'ten'")))
		assert.equal(N / 1000, tonumber(h.scalar(conn,
			"SELECT count(*) FROM projhost.events WHERE split_part(stream_id, '-', 1) = 'tiny'")))
	end)

	it("on a store loaded in bulk, before any statistics", function()
		all_reads("no statistics")
	end)

	it("after ANALYZE", function()
		assert(conn:exec("ANALYZE projhost.events"))
		assert(conn:exec("ANALYZE projhost.streams"))
		assert(conn:exec("ANALYZE projhost.checkpoints"))
		all_reads("analyzed")
	end)
end)

describe("the category index", function()
	it("is built by migrate, and again when a build left it invalid", function()
		local c = h.connect(h.fresh_db("plans_index"))
		assert(schema.migrate(c))
		local valid = "SELECT indisvalid::text FROM pg_index WHERE indexrelid = 'projhost.events_category_idx'::regclass"
		assert.equal("true", h.scalar(c, valid))
		-- what a failed build leaves: an INVALID index of that name (here a
		-- unique one over duplicates)
		assert(c:exec("DROP INDEX projhost.events_category_idx"))
		assert(c:exec("SELECT projhost.append('a-1', NULL, '[{\"type\": \"T\"}, {\"type\": \"T\"}]')"))
		assert.is_nil(c:exec("CREATE UNIQUE INDEX CONCURRENTLY events_category_idx ON projhost.events (event_type)"))
		assert.equal("false", h.scalar(c, valid))
		assert(schema.migrate(c))
		assert.equal("true", h.scalar(c, valid))
		assert.matches("split_part", h.scalar(c, "SELECT pg_get_indexdef('projhost.events_category_idx'::regclass)"))
		c:close()
	end)
end)

describe("the reads of each source", function()
	-- one projection per source kind; each counts what it sees in a table,
	-- which must be exactly its events in gap-free order
	local SRC = {
		all = "{ all = true }",
		cat = '{ category = "acc" }',
		stream = '{ stream = "acc-7" }',
		solo = '{ stream = "solo" }',
		typed = '{ category = "acc", types = { "Rare" } }',
	}
	local TRUTH = {
		all = "SELECT count(*) FROM projhost.events",
		cat = "SELECT count(*) FROM projhost.events WHERE stream_id LIKE 'acc-%'",
		stream = "SELECT count(*) FROM projhost.events WHERE stream_id = 'acc-7'",
		solo = "SELECT count(*) FROM projhost.events WHERE stream_id = 'solo'",
		typed = "SELECT count(*) FROM projhost.events WHERE stream_id LIKE 'acc-%' AND event_type = 'Rare'",
	}

	it("are exactly its events, in order, once", function()
		local dsn = h.fresh_db("plans_sources")
		local c = h.connect(dsn)
		assert(schema.migrate(c))
		assert(c:exec([[CREATE TABLE seen (projection text, position bigint, PRIMARY KEY (projection, position))]]))
		h.insert_events(c, "acc", 3000, 40)
		h.insert_events(c, "accx", 500, 5) -- "accx-1": not category acc
		h.insert_events(c, "other", 2000, 10)
		assert(c:exec("SELECT projhost.append('solo', NULL, '[{\"type\": \"Inc\"}, {\"type\": \"Rare\"}]')"))
		assert(c:exec("UPDATE projhost.events SET event_type = 'Rare' WHERE global_position % 37 = 0"))
		local dir = h.tmpdir()
		for name, from in pairs(SRC) do
			h.write_file(dir .. "/" .. name .. ".lua", ([[
return {
	name = "src_%s",
	from = %s,
	init = function() return { last = 0 } end,
	on_error = function() return "stop" end,
	when = { ["*"] = function(s, e, ctx)
		-- one transaction per load here: positions in commit order
		if e.position <= s.last then error("out of order: " .. e.position .. " after " .. s.last) end
		s.last = e.position
		ctx:exec("INSERT INTO seen VALUES ($1, $2)", "%s", e.position)
	end },
}]]):format(name, from, name))
		end
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir })
		assert.equal(0, code, out .. err)
		for name in pairs(SRC) do
			assert.equal(h.scalar(c, TRUTH[name]),
				h.scalar(c, "SELECT count(*) FROM seen WHERE projection = $1", name), name)
		end
		c:close()
	end)
end)

describe("the reads' planner settings", function()
	-- they price the alternatives to an index range out for projhost's
	-- reads only: a handler's SQL runs with the session's own settings, in
	-- the first batch, in batches whose page was read ahead, partitioned
	-- or not
	local function projection(name, partitioned)
		return ([[
return {
	name = "%s",
	from = { category = "set" },
	%s
	when = { ["*"] = function(_, e, ctx)
		ctx:exec("INSERT INTO settings_seen SELECT $1, $2, current_setting('enable_seqscan') || ' '"
			.. " || current_setting('enable_bitmapscan') || ' ' || current_setting('enable_sort')",
			"%s", e.position)
	end },
}]]):format(name, partitioned and 'partition = "stream",' or "", name)
	end

	it("never reach a handler's statements", function()
		local dsn = h.fresh_db("plans_settings")
		local c = h.connect(dsn)
		assert(schema.migrate(c))
		assert(c:exec("CREATE TABLE settings_seen (projection text, position bigint, settings text)"))
		h.insert_events(c, "set", 200, 4)
		local dir = h.tmpdir()
		h.write_file(dir .. "/flat.lua", projection("flat", false))
		h.write_file(dir .. "/parts.lua", projection("parts", true))
		-- pages of 7: the first batch, then batches on pages read ahead
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = "7" } })
		assert.equal(0, code, out .. err)
		assert.equal("400", h.scalar(c, "SELECT count(*) FROM settings_seen"))
		assert.same({ { settings = "on on on", n = "400" } },
			c:query("SELECT settings, count(*)::text AS n FROM settings_seen GROUP BY 1"))
		c:close()
	end)
end)

describe("the status functions' reads of a category", function()
	-- projhost.unpartitioned_behind (lag, status, metrics), wait_all's last
	-- event of a source and partitions_behind's windows walk the category
	-- index, not the store's (transaction_id, global_position) index past
	-- every other category - on a store imported in one transaction and
	-- analyzed, where the planner's estimates for both are alike. Counted
	-- with the session's index statistics before and after, inside one
	-- transaction (they are not sent off, and reset, inside one).
	local c
	local COUNTS = [[SELECT
		pg_stat_get_xact_tuples_returned('projhost.events_transaction_id_global_position_idx'::regclass) AS tx,
		pg_stat_get_xact_tuples_returned('projhost.events_category_idx'::regclass) AS cat]]
	local function walked(sql, ...)
		assert(c:exec("BEGIN"))
		local r0 = assert(c:query(COUNTS))[1]
		assert(c:query(sql, ...))
		local r = assert(c:query(COUNTS))[1]
		assert(c:exec("ROLLBACK"))
		return tonumber(r.tx) - tonumber(r0.tx), tonumber(r.cat) - tonumber(r0.cat)
	end

	setup(function()
		c = h.connect(h.fresh_db("plans_status"))
		assert(schema.migrate(c))
		-- 20,000 events, category "one" 1% of them (200, 20 streams), one
		-- INSERT (one transaction), then analyzed
		assert(c:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			SELECT CASE WHEN i % 100 = 5 THEN 'one-' || (i / 100 % 20) ELSE 'rest-' || (i % 97) END,
				CASE WHEN i % 100 = 5 THEN i / 2000 + 1 ELSE i / 97 + 1 END, 'Inc', '{}'
			FROM generate_series(0, 19999) i]]))
		assert(c:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			SELECT stream_id, max(stream_version), max(global_position) FROM projhost.events GROUP BY 1]]))
		assert(c:exec("ANALYZE"))
		assert(c:exec([[INSERT INTO projhost.sources (projection, name, kind, value, types, partitioned, version)
			VALUES ('flat', 'flat', 'category', 'one', NULL, false, 1),
				('typed', 'typed', 'category', 'one', '{Rare}', false, 1),
				('parts', 'parts', 'category', 'one', NULL, true, 1)]]))
		-- past the store's first event (not category "one"): the import's
		-- transaction, as after a first batch (from '0' the estimates
		-- differ)
		assert(c:exec([[INSERT INTO projhost.checkpoints (projection, partition, last_tx, last_pos)
			SELECT p, '', transaction_id, global_position FROM projhost.events, unnest('{flat,typed}'::text[]) p
			WHERE global_position = (SELECT min(global_position) FROM projhost.events)]]))
		assert(c:exec([[INSERT INTO projhost.checkpoints (projection, partition, last_pos)
			SELECT 'parts', stream_id, version - 1 FROM projhost.streams WHERE stream_id LIKE 'one-%']]))
	end)
	teardown(function() if c then c:close() end end)

	it("count the events behind in the category's range", function()
		for _, p in ipairs({ "flat", "typed" }) do
			local tx, cat = walked("SELECT * FROM projhost.unpartitioned_behind($1)", p)
			assert.equal(0, tx, p)
			assert.is_true(cat <= 201, p .. ": " .. cat)
		end
		assert.equal("200", h.scalar(c, "SELECT events FROM projhost.unpartitioned_behind('flat')"))
		assert.equal("0", h.scalar(c, "SELECT events FROM projhost.unpartitioned_behind('typed')"))
	end)

	it("look for a source's events before the one waited for in its range", function()
		-- typed's source has none of them: the whole range up to the
		-- store's last event is looked at
		local last = assert(c:query([[SELECT stream_id, stream_version FROM projhost.events
			ORDER BY global_position DESC LIMIT 1]]))[1]
		local tx, cat = walked("SELECT projhost.applied('typed', $1, $2)", last.stream_id, last.stream_version)
		assert.equal(0, tx)
		assert.is_true(cat <= 200, tostring(cat))
		assert.equal("applied", h.scalar(c, "SELECT projhost.applied('typed', $1, $2)",
			last.stream_id, last.stream_version))
		-- and flat has all of its category's still to do
		assert.equal("pending", h.scalar(c, "SELECT projhost.applied('flat', $1, $2)",
			last.stream_id, last.stream_version))
		assert.equal("pending", h.scalar(c, [[SELECT projhost.applied('flat', stream_id, stream_version)
			FROM projhost.events WHERE stream_id LIKE 'one-%' ORDER BY global_position DESC LIMIT 1]]))
	end)

	it("take any category name: quotes, backslashes, a tab, braces, commas", function()
		-- the worker's reads pass it as a parameter inside ARRAY[...], the
		-- status functions quote it into their SQL (events_range)
		local cat = "q'\"\\\t{a,b}ü"
		assert(c:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			SELECT $1 || '-' || s, v, 'Inc', '{}' FROM generate_series(1, 2) s, generate_series(1, 3) v]], cat))
		assert(c:exec([[INSERT INTO projhost.sources (projection, name, kind, value, partitioned, version)
			VALUES ('odd', 'odd', 'category', $1, false, 1), ('odd1', 'odd1', 'stream', $1 || '-1', false, 1)]], cat))
		assert(c:exec([[INSERT INTO projhost.checkpoints (projection, partition) VALUES ('odd', ''), ('odd1', '')]]))
		assert.equal("6", h.scalar(c, "SELECT events FROM projhost.unpartitioned_behind('odd')"))
		assert.equal("3", h.scalar(c, "SELECT events FROM projhost.unpartitioned_behind('odd1')"))
		assert.equal("pending", h.scalar(c, "SELECT projhost.applied('odd1', $1, 3)", cat .. "-1"))
		for _, from in ipairs({ { category = cat }, { stream = cat .. "-2" } }) do
			local sql, fp = reads.page_sql(def(from))
			assert(c:exec("BEGIN"))
			assert(c:exec(reads.PLANNER_SQL))
			local rows = assert(c:query(sql, "0", 0, 100, unpack(fp)))
			assert(c:exec("ROLLBACK"))
			assert.equal(from.category and 6 or 3, #rows)
			for _, r in ipairs(rows) do assert.equal(cat, (r.stream_id:match("^(.*)%-%d$"))) end
		end
	end)

	it("find a source's last event in its range", function()
		assert(c:exec([[UPDATE projhost.checkpoints SET (last_tx, last_pos) = (SELECT transaction_id, global_position
			FROM projhost.events ORDER BY global_position DESC LIMIT 1) WHERE projection = 'flat']]))
		local tx, cat = walked("SELECT projhost.wait_all('flat', 0)")
		assert.equal(0, tx)
		assert.is_true(cat <= 2, tostring(cat))
		assert.equal("true", h.scalar(c, "SELECT projhost.wait_all('flat', 0)::text"))
	end)

	it("look for the partitions behind in the category's range", function()
		local tx = walked("SELECT * FROM projhost.partitions_behind('parts')")
		assert.equal(0, tx)
		assert.equal("20", h.scalar(c, "SELECT count(*) FROM projhost.partitions_behind('parts')"))
	end)
end)
