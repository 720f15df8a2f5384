-- `projhost` commands other than run's loop: usage errors, reset/pause/
-- resume, status, parked, run --demo seeding and the `test` summary line.
local h = require "helpers"
local cjson = require "cjson"
local schema = require "projhost.schema"

local dsn, conn

local function rows(sql, ...)
	local r, msg = conn:query(sql, ...)
	assert(r, msg)
	return r
end

local function checkpoints(name)
	local out = {}
	for _, r in ipairs(rows("SELECT partition, version, status, error FROM projhost.checkpoints "
		.. "WHERE projection = $1 ORDER BY partition", name)) do
		out[r.partition] = { version = tonumber(r.version), status = r.status, error = r.error }
	end
	return out
end

local function seed_checkpoints()
	assert(conn:exec("DELETE FROM projhost.checkpoints"))
	assert(conn:exec([[INSERT INTO projhost.checkpoints (projection, partition, version, status, error, last_pos)
		VALUES ('bal', 'a', 3, 'running', NULL, 10), ('bal', 'b', 3, 'failed', 'boom', 7),
		       ('bal', 'c', 3, 'stopped', 'halt', 9), ('other', '', 1, 'running', NULL, 4)]]))
end

setup(function()
	dsn = h.fresh_db()
	conn = h.connect(dsn)
	assert(schema.migrate(conn))
end)

teardown(function()
	if conn then conn:close() end
end)

describe("usage errors", function()
	it("an unknown command exits 2 with the usage on stderr", function()
		local code, out, err = h.run({ "frobnicate" })
		assert.equal(2, code)
		assert.equal("", out)
		assert.matches("^projhost: unknown command 'frobnicate'\nusage:\n", err)
		assert.matches("projhost append STREAM TYPE", err)
	end)

	it("an unknown flag exits 2 with that command's usage", function()
		local code, out, err = h.run({ "status", "--nope" })
		assert.equal(2, code)
		assert.equal("", out)
		assert.equal("projhost: unknown flag '--nope' for status\nusage: projhost status [NAME] [--json] [--failed] "
			.. "[--behind] [--limit N] [--db DSN]\n", err)
	end)

	it("missing arguments and bad numbers exit 2", function()
		local cases = {
			{ { "reset" }, "reset needs more arguments" },
			{ { "pause", "a", "b" }, "too many arguments for pause: 'b'" },
			{ { "run", "--workers", "two" }, "--workers needs a whole number, not 'two'" },
			{ { "append", "s", "T", "--expected-version", "-1" }, "--expected-version needs a whole number, not '-1'" },
			{ { "status", "--db" }, "--db needs a value" },
			{ { "parked", "sweep" }, "unknown parked subcommand 'sweep'" },
			{ { "db" }, "db needs more arguments" },
		}
		for _, c in ipairs(cases) do
			local code, out, err = h.run(c[1])
			assert.equal(2, code, table.concat(c[1], " "))
			assert.equal("", out)
			assert.equal("projhost: " .. c[2], err:match("^(.-)\n"))
			assert.matches("\nusage: projhost " .. c[1][1], err)
		end
	end)

	it("--workers outside 1..core.max_workers is misuse: exit 2 before anything runs", function()
		assert.equal(64, require("projhost.core").max_workers)
		for _, n in ipairs({ "0", "-1", "65", "1000", "99999999999999999999" }) do
			local code, out, err = h.run({ "run", "--once", "--workers", n, "--db", dsn, h.tmpdir() })
			assert.equal(2, code, n .. ": " .. err)
			assert.equal("", out)
			assert.matches("^projhost: %-%-workers ", err)
			assert.matches("\nusage: projhost run ", err)
		end
		local dir = h.tmpdir()
		h.write_file(dir .. "/noop.lua", 'return { from = { category = "noop" }, when = { ["*"] = function() end } }')
		local code, out, err = h.run({ "run", "--once", "--workers", "64", "--db", h.fresh_db("cli_workers"), dir })
		assert.equal(0, code, out .. err)
		assert.matches("noop pos=0 caught up", err)
	end)

	it("help and version print to stdout and exit 0", function()
		local code, out = h.run({ "--help" })
		assert.equal(0, code)
		for _, cmd in ipairs({ "run", "append", "status", "wait", "reset", "pause", "resume", "parked", "db", "test" }) do
			assert.matches("projhost " .. cmd .. " ", out)
		end
		code, out = h.run({ "append", "-h" })
		assert.equal(0, code)
		assert.matches("^usage: projhost append STREAM TYPE", out)
		code, out = h.run({ "version" })
		assert.equal(0, code)
		assert.matches("^projhost %d+%.%d+%.%d+\n$", out)
	end)
end)

describe("reset, pause, resume", function()
	before_each(seed_checkpoints)

	local function listen()
		local l = h.connect(dsn)
		assert(l:exec("LISTEN projhost"))
		return l
	end

	it("pause pauses running partitions and keeps failed/stopped ones with their errors", function()
		local l = listen()
		local code, out, err = h.run({ "pause", "bal", "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("paused bal (1 partition)\n", out)
		assert.same({
			a = { version = 3, status = "paused" },
			b = { version = 3, status = "failed", error = "boom" },
			c = { version = 3, status = "stopped", error = "halt" },
		}, checkpoints("bal"))
		assert.same({ [""] = { version = 1, status = "running" } }, checkpoints("other"))
		local notes = l:notifies(2)
		l:close()
		assert.equal("0 *", notes[1] and notes[1].payload)
	end)

	it("resume sets every partition running and clears errors", function()
		assert(h.run({ "pause", "bal", "--db", dsn }) == 0)
		local l = listen()
		local code, out, err = h.run({ "resume", "bal", "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("resumed bal (1 paused, 1 failed, 1 stopped)\n", out)
		assert.same({
			a = { version = 3, status = "running" },
			b = { version = 3, status = "running" },
			c = { version = 3, status = "running" },
		}, checkpoints("bal"))
		local notes = l:notifies(2)
		l:close()
		assert.equal("0 *", notes[1] and notes[1].payload)
		code, out = h.run({ "resume", "bal", "--db", dsn })
		assert.equal(0, code)
		assert.equal("bal: already running\n", out)
	end)

	it("reset sets version 0 (rebuild pending), running, no error, and wakes hosts", function()
		local l = listen()
		local code, out, err = h.run({ "reset", "bal", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("^reset bal %(3 partitions%): .*rebuild", out)
		assert.same({
			a = { version = 0, status = "running" },
			b = { version = 0, status = "running" },
			c = { version = 0, status = "running" },
		}, checkpoints("bal"))
		assert.same({ [""] = { version = 1, status = "running" } }, checkpoints("other"))
		local notes = l:notifies(2)
		l:close()
		assert.equal("0 *", notes[1] and notes[1].payload)
	end)

	it("an unknown name fails, listing the known ones, and changes nothing", function()
		for _, cmd in ipairs({ "reset", "pause", "resume" }) do
			local code, out, err = h.run({ cmd, "nope", "--db", dsn })
			assert.equal(1, code)
			assert.equal("", out)
			assert.equal("projhost: " .. cmd .. ": no projection named nope (known: bal, other)\n", err)
		end
		assert.equal(3, checkpoints("bal").a.version)
	end)
end)

describe("unknown projection names exit 1 and change nothing", function()
	before_each(function()
		seed_checkpoints()
		assert(conn:exec("DELETE FROM projhost.parked"))
		assert(conn:exec([[INSERT INTO projhost.parked (projection, partition, global_position, error)
			VALUES ('bal', 'a', 5, 'no funds')]]))
	end)

	it("for status, parked list|retry|skip, reset, pause and resume", function()
		for _, args in ipairs({ { "status", "NOPE" }, { "status", "NOPE", "--json" }, { "parked", "list", "NOPE" },
			{ "parked", "retry", "NOPE" }, { "parked", "skip", "NOPE" }, { "reset", "NOPE" }, { "pause", "NOPE" },
			{ "resume", "NOPE" } }) do
			local what = args[1] == "parked" and (args[1] .. " " .. args[2]) or args[1]
			args[#args + 1] = "--db"
			args[#args + 1] = dsn
			local code, out, err = h.run(args)
			assert.equal(1, code, table.concat(args, " "))
			assert.equal("", out)
			assert.equal("projhost: " .. what .. ": no projection named NOPE (known: bal, other)\n", err)
		end
		assert.same({ { projection = "bal", retry_requested = "false" } },
			rows("SELECT projection, retry_requested::text FROM projhost.parked"))
		assert.equal(3, checkpoints("bal").a.version)
	end)

	it("status NAME shows that projection only", function()
		local code, out, err = h.run({ "status", "other", "--json", "--db", dsn })
		assert.equal(0, code, err)
		local s = cjson.decode(out)
		assert.equal(1, #s.projections)
		assert.equal("other", s.projections[1].name)
		code, out, err = h.run({ "status", "bal", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("\nbal%s", out)
		assert.is_nil(out:find("\nother", 1, true))
	end)
end)

describe("append --file", function()
	local function count(pattern)
		return tonumber(rows("SELECT count(*) AS n FROM projhost.events WHERE stream_id LIKE $1", pattern)[1].n)
	end

	local function file_of(lines, text)
		return h.write_file(h.tmpdir() .. "/events.ndjson", text or (table.concat(lines, "\n") .. "\n"))
	end

	it("names the line of an error the server finds, and writes nothing", function()
		local lines = {
			'{"stream":"srv-1","type":"A"}',
			'{"stream":"srv-1","type":"A","data":{"ok":"fine"}}',
			'{"stream":"srv-1","type":"A","data":{"s":"nul \\u0000 here"}}',
			'{"stream":"srv-2","type":"A"}',
		}
		local file = file_of(lines)
		local code, out, err = h.run({ "append", "--file", file, "--db", dsn })
		assert.equal(1, code)
		assert.equal("", out)
		assert.matches("^projhost: append: " .. file:gsub("%p", "%%%0") .. ":3: .*[Uu]nicode.*%[22P05%]\n$", err)
		assert.equal(0, count("srv-%"))

		-- a brace the UUID syntax check lets through, in the second chunk
		lines = {}
		for i = 1, 7000 do lines[i] = ('{"stream":"srv-%d","type":"A"}'):format(i % 7) end
		lines[6543] = '{"stream":"srv-1","type":"A","id":"{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}'
		file = file_of(lines)
		code, out, err = h.run({ "append", "--file", file, "--db", dsn })
		assert.equal(1, code)
		assert.matches("^projhost: append: " .. file:gsub("%p", "%%%0") .. ":6543: .*uuid.*%[22P02%]\n$", err)
		assert.equal(0, count("srv-%"))
	end)

	it("names the line of a conflict with an earlier chunk of the same file (and from stdin)", function()
		local lines = {}
		for i = 1, 12000 do lines[i] = ('{"stream":"dup-%d","type":"A"}'):format(i % 3) end
		local id = '"id":"6f1e2a8c-4b7d-4e0f-9a3b-2c5d8e1f0a47"'
		lines[20] = '{"stream":"dup-1","type":"A",' .. id .. '}'
		lines[11111] = '{"stream":"dup-2","type":"B",' .. id .. '}'
		local file = file_of(lines)
		local code, out, err = h.run({ "append", "--file", file, "--db", dsn })
		assert.equal(1, code)
		assert.equal("", out)
		assert.matches("^projhost: append: " .. file:gsub("%p", "%%%0") .. ":11111: .*%[23505%]\n$", err)
		assert.equal(0, count("dup-%"))
		code, out, err = h.run({ "append", "--file", "-", "--db", dsn }, { stdin = h.read_file(file) })
		assert.equal(1, code)
		assert.matches("^projhost: append: stdin:11111: .*%[23505%]\n$", err)
		assert.equal(0, count("dup-%"))
	end)

	it("accepts a UTF-8 byte order mark at the start of the file", function()
		local file = file_of(nil, '\239\187\191{"stream":"bom-1","type":"A"}\n{"stream":"bom-1","type":"B"}\n')
		local code, out, err = h.run({ "append", "--file", file, "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("appended 2 events\n", out)
		assert.equal(2, count("bom-%"))
		-- only at the start: anywhere else it is not JSON
		file = file_of(nil, '{"stream":"bom-2","type":"A"}\n\239\187\191{"stream":"bom-2","type":"B"}\n')
		code, out, err = h.run({ "append", "--file", file, "--db", dsn })
		assert.equal(1, code)
		assert.matches(":2: invalid JSON", err)
		assert.equal(0, count("bom-2"))
	end)
end)

describe("status", function()
	it("--json reports projections, the horizon, parked and the top position", function()
		seed_checkpoints()
		local twelve = {}
		for i = 1, 12 do twelve[i] = { type = "E" .. i } end
		assert(conn:query("SELECT projhost.append('st-1', NULL, $1::jsonb)", cjson.encode(twelve)))
		local top = tonumber(rows("SELECT max(global_position) AS p FROM projhost.events")[1].p)
		assert(conn:exec("DELETE FROM projhost.parked"))
		assert(conn:exec([[INSERT INTO projhost.parked (projection, global_position, error)
			VALUES ('bal', 1, 'bad'), ('bal', 2, 'worse')]]))
		-- a transaction with an xid holds the horizon back
		local holder = h.connect(dsn)
		assert(holder:exec("BEGIN"))
		assert(holder:query("SELECT pg_current_xact_id()"))
		local code, out, err = h.run({ "status", "--json", "--db", dsn })
		local holder_pid = holder:pid()
		holder:exec("ROLLBACK")
		holder:close()
		assert.equal(0, code, err)
		local s = cjson.decode(out)
		assert.equal(top, s.events)
		assert.equal(2, s.parked)
		assert.equal(holder_pid, s.horizon.pid)
		assert.equal("idle in transaction", s.horizon.state)
		assert.is_number(s.horizon.age_s)
		assert.equal(2, #s.projections)
		local bal = s.projections[1]
		assert.equal("bal", bal.name)
		assert.equal(3, bal.partitions)
		assert.equal("failed", bal.status)
		assert.same({ running = 1, paused = 0, failed = 1, stopped = 1, done = 0, held = 0 }, bal.statuses)
		assert.equal(10, bal.position)
		-- its streams a, b, c have no events: nothing behind (issue 13: no
		-- longer the top position minus its own); its source is not known
		-- (no projhost.sources row), so the figure is labelled an estimate
		assert.equal(0, bal.behind)
		assert.is_true(bal.behind_estimated)
		assert.matches("^[bc]: ", bal.error)
		assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", bal.updated_at)
		assert.equal("other", s.projections[2].name)
		assert.equal("running", s.projections[2].status)
		assert.equal(cjson.null, s.projections[2].error)
	end)

	it("prints a table and the horizon line for people", function()
		seed_checkpoints()
		local code, out, err = h.run({ "status", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("PROJECTION%s+PARTITIONS%s+STATUS", out)
		assert.matches("\nbal%s+3%s+failed 1/3%s+10%s", out)
		assert.matches("\nother%s+1%s+running%s+4%s", out)
		assert.matches("\nhorizon: ", out)
	end)

	it("--json with no checkpoints has an empty projections array", function()
		local fresh = h.fresh_db("cli_empty")
		local code, out, err = h.run({ "status", "--json", "--db", fresh })
		assert.equal(0, code, err)
		assert.matches('"projections": %[%]', out)
		assert.equal(0, cjson.decode(out).events)
	end)
end)

describe("parked", function()
	before_each(function()
		assert(conn:exec("DELETE FROM projhost.parked"))
		assert(conn:exec([[INSERT INTO projhost.parked (projection, partition, global_position, stream_id,
			stream_version, event_type, error) VALUES ('bal', 'account-1', 5, 'account-1', 2, 'Withdrawn', 'no funds'),
			('other', '', 6, 'x-1', 1, 'X', 'oops')]]))
	end)

	it("list shows parked events, optionally of one projection", function()
		local code, out, err = h.run({ "parked", "list", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("account%-1@2 Withdrawn", out)
		assert.matches("no funds", out)
		assert.matches("x%-1@1 X", out)
		code, out = h.run({ "parked", "list", "other", "--db", dsn })
		assert.equal(0, code)
		assert.is_nil(out:find("Withdrawn", 1, true))
		assert.matches("oops", out)
	end)

	it("skip drops them; retry flags them for the running hosts", function()
		local code, out, err = h.run({ "parked", "retry", "other", "--db", dsn })
		assert.equal(0, code, err)
		assert.matches("^retrying 1 parked event of other", out)
		assert.same({ { projection = "bal", retry_requested = "false" }, { projection = "other", retry_requested = "true" } },
			rows("SELECT projection, retry_requested::text FROM projhost.parked ORDER BY 1"))
		code, out, err = h.run({ "parked", "skip", "bal", "--db", dsn })
		assert.equal(0, code, err)
		assert.equal("skipped 1 parked event of bal\n", out)
		assert.equal("other", rows("SELECT projection FROM projhost.parked")[1].projection)
		assert.equal(1, #rows("SELECT 1 FROM projhost.parked"))
	end)
end)

describe("run --demo", function()
	it("seeds 2,000 account events into an empty store, once", function()
		local fresh = h.fresh_db("cli_demo")
		local dir = h.tmpdir()
		local p = h.spawn({ "run", "--demo", "--once", "--db", fresh, dir })
		local c = h.connect(fresh)
		local function n()
			local r = c:query("SELECT count(*) AS n FROM projhost.events")
			return r and tonumber(r[1].n)
		end
		h.wait_until(function() return n() == 2000 end, 20, "2000 demo events")
		p:kill()
		p:wait(10)
		assert.matches("seeded 2000 demo events", p:output())
		local r = c:query([[SELECT count(DISTINCT stream_id) AS streams,
			count(*) FILTER (WHERE event_type = 'Withdrawn' AND (data->>'amount')::int >= 100) AS big,
			count(*) FILTER (WHERE stream_id !~ '^account-([1-9]|1[0-9]|20)$') AS odd FROM projhost.events]])[1]
		assert.equal("20", r.streams)
		assert.is_true(tonumber(r.big) > 0)
		assert.equal("0", r.odd)
		-- a second start finds events and seeds nothing
		p = h.spawn({ "run", "--demo", "--once", "--db", fresh, dir })
		-- seeding comes before anything else run prints
		h.wait_until(function() return not p:alive() or p:output() ~= "" end, 20, "the second run to get going")
		p:kill()
		p:wait(10)
		assert.equal(2000, n())
		assert.is_nil(p:output():match("seeded"))
		c:close()
	end)
end)

describe("projhost test", function()
	it("ends with one summary line and fails when anything failed", function()
		local dir = h.tmpdir()
		h.write_file(dir .. "/a_spec.lua", [[
			describe("x", function()
				it("passes", function() assert.is_true(true) end)
				it("fails", function() assert.equal(1, 2) end)
				it("errors", function() error("kaput") end)
				pending("later")
			end)]])
		h.write_file(dir .. "/b_spec.lua", "this is not lua")
		local code, out = h.run({ "test", dir }, { cwd = h.root })
		assert.equal(1, code)
		assert.equal("1 passed, 3 failed", out:match("([^\n]*)\n$"))
		assert.matches("kaput", out)

		os.remove(dir .. "/b_spec.lua")
		h.write_file(dir .. "/a_spec.lua", [[it("ok", function() end) it("ok too", function() end)]])
		code, out = h.run({ "test", dir }, { cwd = h.root })
		assert.equal(0, code)
		assert.equal("2 passed, 0 failed", out:match("([^\n]*)\n$"))
	end)
end)
