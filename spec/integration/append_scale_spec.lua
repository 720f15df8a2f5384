-- Bulk loads at scale (issue 11): `projhost append --file` stages the file
-- and moves it into the store with one set-based step, so each stream's row
-- is written once per file and the streams are locked once, in order; a
-- large load leaves the tables analyzed. Each test has a database of its
-- own: the statistics counters it reads are per database.
local h = require "helpers"
local cjson = require "cjson"
local schema = require "projhost.schema"

local function one(c, sql, ...)
	local rows, msg = c:query(sql, ...)
	assert(rows, msg)
	return rows[1]
end

local function fresh(name)
	local dsn = h.fresh_db(name)
	local c = h.connect(dsn)
	assert(schema.migrate(c))
	return dsn, c
end

-- n lines over `streams` streams named PREFIX-0..., line i carries data.i = i
local function ndjson(prefix, n, streams, edit)
	local lines = {}
	for i = 1, n do
		lines[i] = ('{"stream":"%s-%d","type":"A","data":{"i":%d}}'):format(prefix, i % streams, i)
	end
	if edit then edit(lines) end
	return table.concat(lines, "\n") .. "\n"
end

local function file(text)
	return h.write_file(h.tmpdir() .. "/events.ndjson", text)
end

local function count(c, like)
	return tonumber(one(c, "SELECT count(*) AS n FROM projhost.events WHERE stream_id LIKE $1", like).n)
end

-- Rows updated in projhost.streams by backends that have reported their
-- statistics (a backend reports at the latest when it exits, in one go).
local function streams_updates(c)
	return tonumber(one(c, "SELECT n_tup_upd AS n FROM pg_stat_user_tables "
		.. "WHERE schemaname = 'projhost' AND relname = 'streams'").n)
end

after_each(function() h.stop_all() end)

describe("projhost append --file at scale", function()
	it("updates each stream's row once per file, however many chunks it takes", function()
		local dsn, c = fresh("scale_once")
		-- 12,000 lines = three chunks of append_many's size, over 10 streams
		local code, out, err = h.run({ "append", "--file", file(ndjson("once", 12000, 10)), "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("appended 12000 events\n", out)
		h.wait_until(function() return streams_updates(c) > 0 end, 20, "the load's statistics")
		assert.equal(10, streams_updates(c))
		local s = one(c, "SELECT version, last_position FROM projhost.streams WHERE stream_id = 'once-3'")
		assert.equal("1200", s.version)
		assert.equal(one(c, "SELECT max(global_position) AS p FROM projhost.events WHERE stream_id = 'once-3'").p,
			s.last_position)
		-- versions follow file order within a stream, positions file order overall
		local r = one(c, "SELECT (data->>'i')::int AS i FROM projhost.events WHERE stream_id = 'once-3' "
			.. "AND stream_version = 1100")
		assert.equal(10993, tonumber(r.i))
		r = one(c, "SELECT bool_and(ok) AS ok FROM (SELECT (data->>'i')::bigint > lag((data->>'i')::bigint, 1, 0) "
			.. "OVER (ORDER BY global_position) AS ok FROM projhost.events) t")
		assert.equal("t", r.ok)
		c:close()
	end)

	it("continues streams that exist, and two loads over the same streams queue up instead of deadlocking",
		function()
		local dsn, c = fresh("scale_order")
		assert(c:query("SELECT projhost.append('dl-0', NULL, '[{\"type\":\"Old\"}]')"))
		-- Load A writes dl-a in its first chunk, load B dl-b; their last
		-- chunks need dl-0 (which we hold) and each other's stream. Locking
		-- chunk by chunk, A would hold dl-a waiting for dl-b and B the reverse.
		local function load(first, other)
			local lines = {}
			for i = 1, 5000 do lines[i] = ('{"stream":"%s","type":"A"}'):format(first) end
			lines[#lines + 1] = '{"stream":"dl-0","type":"B"}'
			lines[#lines + 1] = ('{"stream":"%s","type":"B"}'):format(other)
			return file(table.concat(lines, "\n"))
		end
		assert(c:exec("BEGIN"))
		assert(c:query("SELECT 1 FROM projhost.streams WHERE stream_id = 'dl-0' FOR UPDATE"))
		local a = h.spawn({ "append", "--file", load("dl-a", "dl-b"), "--db", dsn })
		local b = h.spawn({ "append", "--file", load("dl-b", "dl-a"), "--db", dsn })
		local waiting = pcall(h.wait_until, function()
			local r = c:query("SELECT count(DISTINCT pid) AS n FROM pg_locks WHERE NOT granted")
			return r and tonumber(r[1].n) == 2
		end, 30, "both loads waiting for dl-0")
		assert(c:exec("COMMIT"))
		assert.equal(0, a:wait(60), a:output())
		assert.equal(0, b:wait(60), b:output())
		assert.is_true(waiting, "the loads never both waited for dl-0")
		assert.equal("3", one(c, "SELECT version FROM projhost.streams WHERE stream_id = 'dl-0'").version)
		assert.equal("5001", one(c, "SELECT version FROM projhost.streams WHERE stream_id = 'dl-a'").version)
		assert.equal("5001", one(c, "SELECT version FROM projhost.streams WHERE stream_id = 'dl-b'").version)
		local got = {}
		for _, row in ipairs(c:query("SELECT stream_version AS v FROM projhost.events WHERE stream_id = 'dl-0' "
			.. "ORDER BY global_position")) do
			got[#got + 1] = row.v
		end
		assert.same({ "1", "2", "3" }, got)
		c:close()
	end)

	it("writes nothing when an event id at line N of a large file is already taken, and names line N", function()
		local dsn, c = fresh("scale_dup")
		local id = "3b241101-e2bb-4255-8caf-4136c566a962"
		assert(c:query("SELECT projhost.append('dup-x', NULL, $1::jsonb)", '[{"type":"A","id":"' .. id .. '"}]'))
		local path = file(ndjson("dup", 12000, 7, function(lines)
			lines[11999] = '{"stream":"dup-1","type":"A","id":"' .. id:upper() .. '"}'
		end))
		local code, out, err = h.run({ "append", "--file", path, "--db", dsn })
		assert.equal(1, code)
		assert.equal("", out)
		assert.matches("^projhost: append: " .. path:gsub("%p", "%%%0") .. ":11999: duplicate key value .*%[23505%]\n$",
			err)
		assert.equal(0, count(c, "dup-%") - 1)

		-- a line repeating an earlier line's id: the later line is the culprit
		local other = "9c5b94b1-35ad-49bb-b118-8e8fc24abf80"
		path = file(ndjson("dup", 12000, 7, function(lines)
			lines[30] = '{"stream":"dup-2","type":"A","id":"' .. other .. '"}'
			lines[11000] = '{"stream":"dup-3","type":"A","id":"' .. other .. '"}'
		end))
		code, _, err = h.run({ "append", "--file", path, "--db", dsn })
		assert.equal(1, code)
		assert.matches("^projhost: append: " .. path:gsub("%p", "%%%0") .. ":11000: duplicate key value .*%[23505%]\n$",
			err)
		assert.equal(0, count(c, "dup-%") - 1)
		c:close()
	end)

	it("names the line of an event the server's checks refuse in a later chunk, writing nothing", function()
		local dsn, c = fresh("scale_check")
		local path = file(ndjson("chk", 12000, 7, function(lines)
			lines[11001] = '{"stream":"chk\\u00071","type":"A"}'
		end))
		local code, _, err = h.run({ "append", "--file", path, "--db", dsn })
		assert.equal(1, code)
		assert.equal("projhost: append: " .. path .. ":11001: stream name contains a control character "
			.. "(U+0007 at character 4); control characters U+0000-U+001F and U+007F are not allowed\n", err)
		-- and what no check catches is found by the server where it fails
		path = file(ndjson("chk", 12000, 7, function(lines)
			lines[10500] = '{"stream":"chk-1","type":"A","data":{"s":"\\u0000"}}'
		end))
		code, _, err = h.run({ "append", "--file", path, "--db", dsn })
		assert.equal(1, code)
		assert.matches("^projhost: append: " .. path:gsub("%p", "%%%0") .. ":10500: .*%[22P05%]\n$", err)
		assert.equal(0, count(c, "chk%"))
		c:close()
	end)
end)

describe("statistics after a bulk load", function()
	local function reltuples(c, rel)
		return tonumber(one(c, "SELECT reltuples AS n FROM pg_class WHERE oid = $1::regclass", rel).n)
	end

	it("append --file analyzes events and streams after a load that grew them", function()
		local dsn, c = fresh("scale_analyze")
		local code, _, err = h.run({ "append", "--file", file(ndjson("an", 3, 1)), "--db", dsn })
		assert.equal(0, code, err)
		-- three events are not worth it (nor would autovacuum analyze them)
		assert.equal(-1, reltuples(c, "projhost.events"))
		code, _, err = h.run({ "append", "--file", file(ndjson("an", 20000, 500)), "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("", err)
		assert.equal(20003, reltuples(c, "projhost.events"))
		assert.equal(500, reltuples(c, "projhost.streams"))
		c:close()
	end)

	it("projhost.analyze_if_grown() analyzes what grew since its last ANALYZE, for loads by other means", function()
		local _, c = fresh("scale_grown")
		local events = {}
		for i = 1, 5000 do events[i] = { stream = "g-" .. (i % 2500), type = "A" } end
		assert(c:query("SELECT projhost.append_many($1::jsonb)", cjson.encode(events)))
		local rows = assert(c:query("SELECT * FROM projhost.analyze_if_grown() ORDER BY 1"))
		assert.equal(2, #rows)
		assert.equal("projhost.events", rows[1].analyzed)
		assert.equal("projhost.streams", rows[2].analyzed)
		assert.equal(5000, reltuples(c, "projhost.events"))
		-- nothing grew since
		assert.equal(0, #assert(c:query("SELECT * FROM projhost.analyze_if_grown()")))
		c:close()
	end)
end)
