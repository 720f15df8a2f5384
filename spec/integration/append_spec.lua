-- projhost.append / append_many (design §2) and `projhost append`, against
-- a real PostgreSQL (spec/helpers.lua starts a throwaway cluster).
local h = require "helpers"
local cjson = require "cjson"
local core = require "projhost.core"
local schema = require "projhost.schema"

local dsn, conn

local function append(stream, expected, events)
	return conn:query("SELECT projhost.append($1, $2, $3::jsonb) AS v", stream, expected,
		type(events) == "string" and events or cjson.encode(events))
end

local function one(sql, ...)
	local rows, msg = conn:query(sql, ...)
	assert(rows, msg)
	return rows[1]
end

local function count(stream_like)
	return tonumber(one("SELECT count(*) AS n FROM projhost.events WHERE stream_id LIKE $1", stream_like).n)
end

setup(function()
	dsn = h.fresh_db()
	conn = h.connect(dsn)
	assert(schema.migrate(conn))
end)

teardown(function()
	if conn then conn:close() end
end)

describe("projhost.append", function()
	it("numbers each stream's versions densely from 1 and returns the new version", function()
		local rows = assert(append("dense-1", nil, { { type = "A" }, { type = "B", data = { n = 1 } } }))
		assert.equal("2", rows[1].v)
		rows = assert(append("dense-1", nil, { { type = "C" }, { type = "D" }, { type = "E" } }))
		assert.equal("5", rows[1].v)
		assert(append("dense-2", nil, { { type = "A" } }))
		local got = {}
		for _, r in ipairs(conn:query("SELECT stream_version, event_type FROM projhost.events "
			.. "WHERE stream_id = 'dense-1' ORDER BY global_position")) do
			got[#got + 1] = r.stream_version .. r.event_type
		end
		assert.same({ "1A", "2B", "3C", "4D", "5E" }, got)
		local s = one("SELECT version, last_position, "
			.. "(SELECT max(global_position) FROM projhost.events WHERE stream_id = 'dense-1') AS top "
			.. "FROM projhost.streams WHERE stream_id = 'dense-1'")
		assert.equal("5", s.version)
		assert.equal(s.top, s.last_position)
		local e = one("SELECT data::text AS data, metadata::text AS metadata FROM projhost.events "
			.. "WHERE stream_id = 'dense-1' AND stream_version = 2")
		assert.equal('{"n": 1}', e.data)
		assert.equal("{}", e.metadata)
	end)

	it("checks the expected version: NULL any, 0 new stream, N exactly N", function()
		assert.equal("1", assert(append("ev-1", 0, { { type = "A" } }))[1].v)
		local rows, msg, code = append("ev-1", 0, { { type = "A" } })
		assert.is_nil(rows)
		assert.equal("wrong expected version for stream 'ev-1': expected 0, actual 1", msg)
		assert.equal("P0001", code)
		assert.equal("3", assert(append("ev-1", 1, { { type = "B" }, { type = "C" } }))[1].v)
		rows, msg, code = append("ev-1", 5, { { type = "D" } })
		assert.is_nil(rows)
		assert.equal("wrong expected version for stream 'ev-1': expected 5, actual 3", msg)
		assert.equal("P0001", code)
		rows, msg = append("ev-2", 4, { { type = "D" } })
		assert.equal("wrong expected version for stream 'ev-2': expected 4, actual 0", msg)
		assert.equal("4", assert(append("ev-1", nil, { { type = "D" } }))[1].v)
		assert.equal(4, count("ev-1"))
		assert.equal(0, count("ev-2"))
		assert.is_nil(one("SELECT version FROM projhost.streams WHERE stream_id = 'ev-2'"))
	end)

	it("rejects malformed events with 22023 naming the element, writing nothing", function()
		local cases = {
			{ { { type = "A" }, { data = {} } }, 'event at index 1: needs a non-empty string "type"' },
			{ { { type = "A" }, { type = "" } }, 'event at index 1: needs a non-empty string "type"' },
			{ '[{"type":"A","data":[1]}]', 'event at index 0: "data" must be an object' },
			{ '[{"type":"A","metadata":"x"}]', 'event at index 0: "metadata" must be an object' },
			{ '[{"type":"A"},{"type":"B"},{"type":"C","id":"not-a-uuid"}]', 'event at index 2: "id" must be a UUID string' },
			{ '[{"type":"A"}, 7]', "event at index 1: is a JSON number, not an object" },
			{ "[]", "events must be a non-empty JSON array of objects" },
			{ '{"type":"A"}', "events must be a non-empty JSON array of objects" },
		}
		for _, c in ipairs(cases) do
			local rows, msg, code = append("bad-1", nil, c[1])
			assert.is_nil(rows)
			assert.equal("22023", code)
			assert.equal("projhost.append: " .. c[2], msg)
		end
		local rows, msg, code = append("", nil, { { type = "A" } })
		assert.is_nil(rows)
		assert.equal("22023", code)
		assert.matches("stream must be a non%-empty string", msg)
		assert.equal(0, count("bad-%"))
		assert.is_nil(one("SELECT 1 AS x FROM projhost.streams WHERE stream_id = 'bad-1'"))
	end)

	it("keeps a given event id and refuses to store it twice", function()
		local id = "0b5a6c52-6a3c-4c8e-9a55-2d6d3c1f0a11"
		assert(append("id-1", nil, { { type = "A", id = id } }))
		assert.equal("id-1", one("SELECT stream_id FROM projhost.events WHERE event_id = $1", id).stream_id)
		local rows, _, code = append("id-2", nil, { { type = "A", id = id } })
		assert.is_nil(rows)
		assert.equal("23505", code)
		assert.equal(0, count("id-2"))
	end)

	it("NOTIFYs 'projhost' with '<last position> <stream>' on commit", function()
		local listener = h.connect(dsn)
		assert(listener:exec("LISTEN projhost"))
		assert(append("note-1", nil, { { type = "A" }, { type = "B" } }))
		local top = one("SELECT last_position FROM projhost.streams WHERE stream_id = 'note-1'").last_position
		local got = listener:notifies(2)
		listener:close()
		assert.equal(1, #got)
		assert.equal("projhost", got[1].channel)
		assert.equal(top .. " note-1", got[1].payload)
		assert.equal(conn:pid(), got[1].pid)
	end)

	it("stamps transaction_id with the appending transaction's xid8", function()
		assert(conn:exec("BEGIN"))
		assert(append("tx-1", nil, { { type = "A" }, { type = "B" } }))
		local r = one("SELECT pg_current_xact_id()::text AS mine, "
			.. "(SELECT array_agg(DISTINCT transaction_id::text) FROM projhost.events WHERE stream_id = 'tx-1')::text AS ids")
		assert(conn:exec("COMMIT"))
		assert.equal("{" .. r.mine .. "}", r.ids)
	end)
end)

-- Stream names (README "SQL"): no control characters (C0 U+0001-U+001F,
-- DEL U+007F; text cannot hold U+0000) and at most 1024 bytes.
local BAD_NAMES = {
	{ "tab", "acct-\t1", "U+0009 at character 6" },
	{ "newline", "acct-1\n", "U+000A at character 7" },
	{ "carriage return", "\racct", "U+000D at character 1" },
	{ "U+0001", "a\1b", "U+0001 at character 2" },
	{ "escape", "a\27[31mred", "U+001B at character 2" },
	{ "U+001F", "x\31", "U+001F at character 2" },
	{ "DEL", "del-\127", "U+007F at character 5" },
}
local CONTROL_RULE = "control characters U+0000-U+001F and U+007F are not allowed"

-- JSON text of an object nested `depth` levels deep ({"a":{...}} counts
-- each object; the innermost holds an array chain when `arrays`).
local function nested(depth, arrays)
	if arrays then
		return '{"a":' .. ("["):rep(depth - 1) .. ("]"):rep(depth - 1) .. "}"
	end
	return ('{"a":'):rep(depth - 1) .. "{}" .. ("}"):rep(depth - 1)
end

describe("stream names and nesting", function()
	local function nothing_written(stream)
		assert.equal(0, tonumber(one("SELECT count(*) AS n FROM projhost.events WHERE stream_id = $1", stream).n))
		assert.is_nil(one("SELECT 1 AS x FROM projhost.streams WHERE stream_id = $1", stream))
	end

	for _, c in ipairs(BAD_NAMES) do
		it("append refuses a stream name with a " .. c[1] .. " (22023, nothing written)", function()
			local rows, msg, code = append(c[2], nil, { { type = "A" } })
			assert.is_nil(rows)
			assert.equal("22023", code)
			assert.equal("projhost.append: stream name contains a control character (" .. c[3] .. "); "
				.. CONTROL_RULE, msg)
			nothing_written(c[2])
		end)
	end

	it("append_many refuses control characters in any element's stream, writing nothing", function()
		for _, c in ipairs(BAD_NAMES) do
			local rows, msg, code = conn:query("SELECT projhost.append_many($1::jsonb) AS n", cjson.encode{
				{ stream = "okmany-1", type = "A" }, { stream = c[2], type = "B" } })
			assert.is_nil(rows, c[1])
			assert.equal("22023", code)
			assert.equal("projhost.append_many: event at index 1: stream name contains a control character ("
				.. c[3] .. "); " .. CONTROL_RULE, msg)
			nothing_written(c[2])
			nothing_written("okmany-1")
		end
	end)

	it("accepts a 1024-byte stream name and refuses 1025 bytes (bytes, not characters)", function()
		local max = "long-" .. ("x"):rep(1019)
		assert.equal(1024, #max)
		assert.equal("1", assert(append(max, nil, { { type = "A" } }))[1].v)
		for _, name in ipairs({ max .. "y", "long-" .. ("\195\169"):rep(510) }) do
			assert.equal(1025, #name)
			local rows, msg, code = append(name, nil, { { type = "A" } })
			assert.is_nil(rows)
			assert.equal("22023", code)
			assert.equal("projhost.append: stream name is 1025 bytes, longer than the limit of 1024 bytes", msg)
			nothing_written(name)
			rows, msg, code = conn:query("SELECT projhost.append_many($1::jsonb) AS n",
				cjson.encode{ { stream = name, type = "A" } })
			assert.is_nil(rows)
			assert.equal("22023", code)
			assert.equal("projhost.append_many: event at index 0: stream name is 1025 bytes, "
				.. "longer than the limit of 1024 bytes", msg)
			nothing_written(name)
		end
		-- a 1024-byte name also through append_many
		assert.equal("1", assert(conn:query("SELECT projhost.append_many($1::jsonb) AS n",
			cjson.encode{ { stream = "lmany-" .. ("z"):rep(1018), type = "A" } }))[1].n)
	end)

	it("accepts data and metadata nested 512 levels deep and refuses 513 (22023, nothing written)", function()
		for _, field in ipairs({ "data", "metadata" }) do
			for _, arrays in ipairs({ false, true }) do
				local ok = ('[{"type":"A","%s":%s}]'):format(field, nested(512, arrays))
				assert(append("deep-ok", nil, ok))
				assert(conn:query("SELECT projhost.append_many($1::jsonb) AS n",
					('[{"stream":"deep-ok","type":"A","%s":%s}]'):format(field, nested(512, arrays))))
				local bad = ('[{"type":"A"},{"type":"B","%s":%s}]'):format(field, nested(513, arrays))
				local rows, msg, code = append("deep-bad", nil, bad)
				assert.is_nil(rows)
				assert.equal("22023", code)
				assert.equal(('projhost.append: event at index 1: "%s" is nested deeper than the limit '
					.. "of 512 levels"):format(field), msg)
				rows, msg, code = conn:query("SELECT projhost.append_many($1::jsonb) AS n",
					('[{"stream":"deep-bad","type":"A","%s":%s}]'):format(field, nested(2000, arrays)))
				assert.is_nil(rows)
				assert.equal("22023", code)
				assert.equal(('projhost.append_many: event at index 0: "%s" is nested deeper than the limit '
					.. "of 512 levels"):format(field), msg)
			end
		end
		assert.equal(8, count("deep-ok"))
		nothing_written("deep-bad")
		-- a wide (not deep) event of the same size is fine
		local wide = {}
		for i = 1, 3000 do wide[i] = '"k' .. i .. '":[{"v":' .. i .. "}]" end
		assert(append("deep-ok", nil, '[{"type":"W","data":{' .. table.concat(wide, ",") .. "}}]"))
	end)

	it("an older store (schema version 1) gets the new rules when migrated", function()
		local old = h.connect(h.fresh_db("append_v1"))
		-- what the previous release's migrate left behind: step 1 only
		assert(old:exec("CREATE SCHEMA projhost"))
		assert(old:exec("CREATE TABLE projhost.schema_version (version int PRIMARY KEY, "
			.. "applied_at timestamptz NOT NULL DEFAULT now())"))
		for _, sql in ipairs(schema.steps[1]) do assert(old:exec(sql)) end
		assert(old:exec("INSERT INTO projhost.schema_version (version) VALUES (1)"))
		-- the old functions let the bad names in
		assert(old:query("SELECT projhost.append($1, NULL, '[{\"type\":\"A\"}]') AS v", "old\tstream"))
		assert(schema.migrate(old))
		local rows, msg, code = old:query("SELECT projhost.append($1, NULL, '[{\"type\":\"A\"}]') AS v", "new\tstream")
		assert.is_nil(rows)
		assert.equal("22023", code)
		assert.matches("control character", msg)
		rows, msg, code = old:query("SELECT projhost.append_many($1::jsonb) AS n",
			cjson.encode{ { stream = ("n"):rep(1025), type = "A" } })
		assert.is_nil(rows)
		assert.equal("22023", code)
		assert.matches("longer than the limit of 1024 bytes", msg)
		rows, msg, code = old:query("SELECT projhost.append('deep', NULL, $1::jsonb) AS v",
			'[{"type":"A","data":' .. nested(513) .. "}]")
		assert.is_nil(rows)
		assert.equal("22023", code)
		assert.matches("nested deeper than the limit of 512 levels", msg)
		assert.equal(tostring(schema.latest), h.scalar(old, "SELECT max(version)::text FROM projhost.schema_version"))
		old:close()
	end)
end)

describe("projhost.append_many", function()
	it("appends in array order, continuing each stream, with one NOTIFY", function()
		assert(append("many-a", nil, { { type = "A0" } }))
		local listener = h.connect(dsn)
		assert(listener:exec("LISTEN projhost"))
		local rows = assert(conn:query("SELECT projhost.append_many($1::jsonb) AS n", cjson.encode{
			{ stream = "many-b", type = "B1" }, { stream = "many-a", type = "A1" },
			{ stream = "many-b", type = "B2", data = { x = 1 } }, { stream = "many-a", type = "A2" },
		}))
		assert.equal("4", rows[1].n)
		local got = {}
		for _, r in ipairs(conn:query("SELECT stream_id, stream_version, event_type FROM projhost.events "
			.. "WHERE stream_id LIKE 'many-%' ORDER BY global_position")) do
			got[#got + 1] = ("%s/%s/%s"):format(r.stream_id, r.stream_version, r.event_type)
		end
		assert.same({ "many-a/1/A0", "many-b/1/B1", "many-a/2/A1", "many-b/2/B2", "many-a/3/A2" }, got)
		assert.equal("3", one("SELECT version FROM projhost.streams WHERE stream_id = 'many-a'").version)
		local top = one("SELECT max(global_position) AS p FROM projhost.events").p
		local notes = listener:notifies(2)
		listener:close()
		assert.equal(1, #notes)
		assert.equal(top .. " *", notes[1].payload)
	end)

	it("rejects an element without a stream, writing nothing", function()
		local rows, msg, code = conn:query("SELECT projhost.append_many($1::jsonb) AS n",
			'[{"stream":"many-c","type":"A"},{"type":"B"}]')
		assert.is_nil(rows)
		assert.equal("22023", code)
		assert.equal('projhost.append_many: event at index 1: needs a non-empty string "stream"', msg)
		assert.equal(0, count("many-c"))
	end)
end)

describe("projhost append (CLI)", function()
	it("appends one event and prints the stream's new version", function()
		local code, out, err = h.run({ "append", "cli-1", "Deposited", '{"amount":5,"tags":[]}',
			"--metadata", '{"by":"spec"}', "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("1\n", out)
		code, out = h.run({ "append", "cli-1", "Withdrawn", "--db", dsn, "--expected-version", "1" })
		assert.equal(0, code)
		assert.equal("2\n", out)
		local e = one("SELECT event_type, data::text AS data, metadata::text AS m FROM projhost.events "
			.. "WHERE stream_id = 'cli-1' AND stream_version = 1")
		assert.equal("Deposited", e.event_type)
		assert.equal('{"tags": [], "amount": 5}', e.data)
		assert.equal('{"by": "spec"}', e.m)
	end)

	it("fails with the server's message on a wrong --expected-version", function()
		local code, out, err = h.run({ "append", "cli-1", "X", "--expected-version", "7", "--db", dsn })
		assert.equal(1, code)
		assert.equal("", out)
		assert.equal("projhost: append: wrong expected version for stream 'cli-1': expected 7, actual 2\n", err)
	end)

	it("rejects JSON that is invalid or not an object", function()
		local code, _, err = h.run({ "append", "cli-2", "X", '{"amount":', "--db", dsn })
		assert.equal(1, code)
		assert.matches("^projhost: append: invalid JSON data: .+\n$", err)
		code, _, err = h.run({ "append", "cli-2", "X", "[1,2]", "--db", dsn })
		assert.equal(1, code)
		assert.matches("^projhost: append: invalid JSON data: expected a JSON object", err)
		code, _, err = h.run({ "append", "cli-2", "X", "--metadata", "nope", "--db", dsn })
		assert.equal(1, code)
		assert.matches("^projhost: append: invalid JSON metadata: ", err)
		assert.equal(0, count("cli-2"))
	end)

	it("exits 1 with the server's message for a bad stream name or nesting, writing nothing", function()
		local code, out, err = h.run({ "append", "cli\tbad", "X", "--db", dsn })
		assert.equal(1, code)
		assert.equal("", out)
		assert.equal("projhost: append: projhost.append: stream name contains a control character "
			.. "(U+0009 at character 4); control characters U+0000-U+001F and U+007F are not allowed\n", err)
		code, out, err = h.run({ "append", ("c"):rep(1025), "X", "--db", dsn })
		assert.equal(1, code)
		assert.equal("projhost: append: projhost.append: stream name is 1025 bytes, longer than the limit "
			.. "of 1024 bytes\n", err)
		code, out, err = h.run({ "append", "cli-deep", "X", nested(513), "--db", dsn })
		assert.equal(1, code)
		assert.equal('projhost: append: projhost.append: event at index 0: "data" is nested deeper than the '
			.. "limit of 512 levels\n", err)
		code, out, err = h.run({ "append", "cli-5", "--file", "-", "--db", dsn },
			{ stdin = '{"type":"A"}\n{"stream":"cli\\u007f5","type":"B"}\n' })
		assert.equal(1, code)
		assert.equal("projhost: append: stdin:2: stream name contains a control character (U+007F at character 4); "
			.. "control characters U+0000-U+001F and U+007F are not allowed\n", err)
		assert.equal(0, count("cli\t%") + count("cli-deep") + count("cli-5") + count("cli\1275"))
		code, out, err = h.run({ "append", "cli-deep", "X", nested(512), "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("1\n", out)
	end)

	it("loads NDJSON from stdin, with STREAM as the default stream", function()
		local input = '{"type":"A","data":{"i":1}}\n\n   \n{"stream":"cli-4","type":"B"}\n{"type":"C","metadata":{"m":1}}\n'
		local code, out, err = h.run({ "append", "cli-3", "--file", "-", "--db", dsn }, { stdin = input })
		assert.equal(0, code, err)
		assert.equal("appended 3 events\n", out)
		assert.equal(2, count("cli-3"))
		assert.equal(1, count("cli-4"))
		assert.equal("C", one("SELECT event_type FROM projhost.events WHERE stream_id = 'cli-3' AND stream_version = 2")
			.event_type)
	end)

	it("bulk-loads 100,000 events from a file in one go", function()
		local dir = h.tmpdir()
		local lines = {}
		for i = 1, 100000 do
			lines[i] = ('{"stream":"bulk-%d","type":"%s","data":{"amount":%d,"i":%d}}')
				:format(i % 100, i % 3 == 0 and "Withdrawn" or "Deposited", i % 250, i)
		end
		local file = h.write_file(dir .. "/events.ndjson", table.concat(lines, "\n") .. "\n")
		local t0 = core.monotime()
		local code, out, err = h.run({ "append", "--file", file, "--db", dsn })
		local took = core.monotime() - t0
		assert.equal(0, code, err)
		assert.equal("appended 100000 events\n", out)
		print(("\n[info] projhost append --file: 100,000 events in %.2f s (%.0f events/s)"):format(took, 100000 / took))
		assert.equal(100000, count("bulk-%"))
		local s = one("SELECT version FROM projhost.streams WHERE stream_id = 'bulk-7'")
		assert.equal("1000", s.version)
		-- versions follow file order within a stream
		local r = one("SELECT (data->>'i')::int AS i FROM projhost.events WHERE stream_id = 'bulk-7' AND stream_version = 3")
		assert.equal(207, tonumber(r.i))
	end)

	it("rejects the whole file when one line is malformed, naming file:line", function()
		local dir = h.tmpdir()
		local lines = {}
		for i = 1, 12000 do lines[i] = ('{"stream":"half-%d","type":"A"}'):format(i % 10) end
		lines[9001] = '{"stream":"half-1","type":"A",'
		local file = h.write_file(dir .. "/bad.ndjson", table.concat(lines, "\n"))
		local code, out, err = h.run({ "append", "--file", file, "--db", dsn })
		assert.equal(1, code)
		assert.equal("", out)
		assert.matches("^projhost: append: " .. file:gsub("%p", "%%%0") .. ":9001: invalid JSON: .+\n$", err)
		assert.equal(0, count("half-%"))

		-- valid JSON that the event rules reject is reported the same way
		lines[9001] = '{"stream":"half-1","data":{}}'
		h.write_file(file, table.concat(lines, "\n"))
		code, _, err = h.run({ "append", "--file", file, "--db", dsn })
		assert.equal(1, code)
		assert.equal("projhost: append: " .. file .. ':9001: needs a non-empty string "type"\n', err)
		assert.equal(0, count("half-%"))

		-- with a STREAM for lines without one: an empty object, a bad
		-- stream, a bad id - the server's rules, each named by its line
		local cases = {
			{ "{}", 'needs a non-empty string "type"' },
			{ ' { } ', 'needs a non-empty string "type"' },
			{ '{"type":"A","stream":7}', 'needs a non-empty string "stream"' },
			{ '{"type":"A","stream":"tab\\there"}', "stream name contains a control character" },
			{ '{"type":"A","id":"nope"}', '"id" must be a UUID string' },
		}
		for _, c in ipairs(cases) do
			local short = { '{"type":"A"}', '{"type":"A"}', c[1], '{"type":"A"}' }
			h.write_file(file, table.concat(short, "\n"))
			code, _, err = h.run({ "append", "half-x", "--file", file, "--db", dsn })
			assert.equal(1, code, c[1])
			assert.equal("projhost: append: " .. file .. ":3: ", err:sub(1, #file + 22), c[1] .. " -> " .. err)
			assert.truthy(err:find(c[2], 1, true), c[1] .. " -> " .. err)
			assert.equal(0, count("half-%"))
		end
	end)
end)

describe("schema.migrate", function()
	it("is idempotent", function()
		assert.is_true(schema.migrate(conn))
		assert.is_true(schema.migrate(conn))
		local r = one("SELECT count(*) AS n, max(version) AS v FROM projhost.schema_version")
		assert.equal(tostring(schema.latest), r.n)
		assert.equal(tostring(schema.latest), r.v)
	end)

	it("lets concurrent first migrations take turns", function()
		local fresh = h.fresh_db("append_concurrent")
		local holder = h.connect(fresh)
		-- Hold the migration lock so every host queues on it, then let go:
		-- all of them then run against an empty database at the same time.
		assert(holder:exec("BEGIN"))
		assert(holder:exec("SELECT pg_advisory_xact_lock($1::bigint)", schema.LOCK_KEY))
		local procs = {}
		for i = 1, 4 do procs[i] = h.spawn({ "status", "--db", fresh }) end
		local queued = pcall(h.wait_until, function()
			local r = holder:query("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
			return r and tonumber(r[1].n) == 4
		end, 5, "4 hosts waiting on the migration lock")
		assert(holder:exec("COMMIT"))
		for i = 1, 4 do
			assert.equal(0, procs[i]:wait(20), procs[i]:output())
		end
		local r = holder:query("SELECT count(*) AS n FROM projhost.schema_version")
		holder:close()
		assert.equal(tostring(schema.latest), r[1].n)
		-- after the exit codes: without the lock the hosts race (and fail) first
		assert.is_true(queued, "the hosts did not queue on schema.LOCK_KEY")
	end)
end)
