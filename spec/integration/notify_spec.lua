-- One NOTIFY at a time (issue 11, "appends at scale"): a committing append
-- notifies unless another one is notifying right now; then it skips, and
-- a host that hears the other one waits until the skipper has committed
-- and wakes every projection. Nothing may be lost: a skipped append is
-- applied without the fallback poll, even when it commits long after the
-- notification that covers it.
local h = require "helpers"
local schema = require "projhost.schema"
local scalar = h.scalar

local CLASS, K = schema.WAKE_LOCK_CLASS, schema.WAKE_EPOCHS

local PARTS = [[
return {
	name = "per_stream",
	from = { category = "nt" },
	partition = "stream",
	setup = { "CREATE TABLE IF NOT EXISTS nt_applied (who text, stream text, version bigint, PRIMARY KEY (who, stream, version))" },
	init = function() return {} end,
	when = {
		A = function(s, e, ctx) ctx:exec("INSERT INTO nt_applied VALUES ('parts', $1, $2)", e.stream, e.version) end,
	},
}
]]

local ALL = [[
return {
	name = "everything",
	from = { category = "nt" },
	init = function() return {} end,
	when = {
		A = function(s, e, ctx) ctx:exec("INSERT INTO nt_applied VALUES ('all', $1, $2)", e.stream, e.version) end,
	},
}
]]

local function append(conn, stream)
	assert(conn:query("SELECT projhost.append($1, NULL, '[{\"type\":\"A\"}]')", stream))
end

local function skips(conn)
	return tonumber(scalar(conn, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM projhost.wake_skips"))
end

describe("NOTIFY of appends", function()
	local dsn, conn

	before_each(function()
		dsn = h.fresh_db("notify")
		conn = h.connect(dsn)
		assert(schema.migrate(conn))
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("names the one stream a transaction appended to, or '*' with the highest position", function()
		local l = h.connect(dsn)
		assert(l:exec("LISTEN projhost"))
		local function top() return scalar(conn, "SELECT max(global_position) FROM projhost.events") end
		local function payloads()
			local out = {}
			for _, n in ipairs(l:notifies(1)) do out[#out + 1] = n.payload end
			return out
		end

		append(conn, "nt-one")
		assert.same({ top() .. " nt-one" }, payloads())

		assert(conn:exec("BEGIN"))
		append(conn, "nt-b")
		append(conn, "nt-a")
		append(conn, "nt-b")
		assert(conn:exec("COMMIT"))
		assert.same({ top() .. " *" }, payloads())

		-- append_many to one stream names it
		assert(conn:query([[SELECT projhost.append_many('[{"stream":"nt-m","type":"A"},{"stream":"nt-m","type":"A"}]')]]))
		assert.same({ top() .. " nt-m" }, payloads())

		-- a savepoint rolled back takes its note with it
		assert(conn:exec("BEGIN"))
		assert(conn:exec("SAVEPOINT s"))
		append(conn, "nt-gone")
		assert(conn:exec("ROLLBACK TO SAVEPOINT s"))
		append(conn, "nt-kept")
		assert(conn:exec("COMMIT"))
		assert.same({ top() .. " nt-kept" }, payloads())

		-- the trigger run early by SET CONSTRAINTS: later appends still announced
		assert(conn:exec("BEGIN"))
		append(conn, "nt-early")
		local early = top()
		assert(conn:exec("SET CONSTRAINTS ALL IMMEDIATE"))
		append(conn, "nt-late")
		assert(conn:exec("COMMIT"))
		assert.same({ early .. " nt-early", top() .. " nt-late" }, payloads())

		-- rows an import writes itself are announced too
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			VALUES ('nt-imported', 1, 999)]]))
		assert.same({ "999 nt-imported" }, payloads())
		-- a name NOTIFY cannot carry (its payload is at most 8000 bytes; an
		-- import by hand may hold longer names) is '*', never a failed commit
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			VALUES ('nt-' || repeat('y', 10000), 1, 1000)]]))
		assert.same({ "1000 *" }, payloads())
		-- any other byte travels as it is (the master's framing escapes it)
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			VALUES (E'nt-tab\there \\ "q"', 1, 1001)]]))
		assert.same({ '1001 nt-tab\there \\ "q"' }, payloads())

		-- append_many to many streams: one notification, the highest position
		assert(conn:query([[SELECT projhost.append_many('[{"stream":"nt-m1","type":"A"},{"stream":"nt-m2","type":"A"},{"stream":"nt-m1","type":"A"}]')]]))
		assert.same({ top() .. " *" }, payloads())

		-- an append and a row other SQL writes, in one transaction: the
		-- append's note covers its own stream, and the other row is
		-- announced as well
		assert(conn:exec("BEGIN"))
		append(conn, "nt-mixed")
		local mixed = top()
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			VALUES ('nt-hand', 1, 5000)]]))
		assert(conn:exec("COMMIT"))
		assert.same({ mixed .. " nt-mixed", "5000 *" }, payloads())
		-- the other row first: one notification for both
		assert(conn:exec("BEGIN"))
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			VALUES ('nt-hand-first', 1, 5500)]]))
		append(conn, "nt-after")
		assert(conn:exec("COMMIT"))
		assert.same({ "5500 *" }, payloads())
		-- an import of many rows in one statement: its first stream, then
		-- '*' once (at most two notifications)
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			VALUES ('nt-i1', 1, 6001), ('nt-i2', 1, 6002), ('nt-i3', 1, 6003)]]))
		assert.same({ "6001 nt-i1", "6002 *" }, payloads())
		-- an UPDATE that sets positions is announced, one of other columns is not
		assert(conn:exec("UPDATE projhost.streams SET last_position = 7000 WHERE stream_id = 'nt-i1'"))
		assert.same({ "7000 nt-i1" }, payloads())
		assert(conn:exec("UPDATE projhost.streams SET updated_at = now() WHERE stream_id = 'nt-i1'"))
		assert.same({}, payloads())

		-- a name with spaces and quotes, appended twice: still named (the
		-- note is split at its first space only)
		assert(conn:exec("BEGIN"))
		append(conn, 'nt-sp ace "q"')
		append(conn, 'nt-sp ace "q"')
		assert(conn:exec("COMMIT"))
		assert.same({ top() .. ' nt-sp ace "q"' }, payloads())
		-- append_staged (append --file): one notification for the load
		assert(conn:exec("BEGIN"))
		assert(conn:query([[SELECT projhost.stage_events('[{"stream":"nt-s1","type":"A"},{"stream":"nt-s2","type":"A"}]', ARRAY[1, 2])]]))
		assert(conn:query("SELECT projhost.append_staged()"))
		assert(conn:exec("COMMIT"))
		assert.same({ top() .. " *" }, payloads())
		-- append_many under SET CONSTRAINTS ALL IMMEDIATE: its rows fire
		-- before its note; both streams are announced all the same
		assert(conn:exec("BEGIN"))
		assert(conn:exec("SET CONSTRAINTS ALL IMMEDIATE"))
		assert(conn:query([[SELECT projhost.append_many('[{"stream":"nt-im1","type":"A"},{"stream":"nt-im2","type":"A"}]')]]))
		assert(conn:exec("COMMIT"))
		local got = payloads()
		assert.equal(2, #got)
		assert.matches(" nt%-im[12]$", got[1])
		assert.matches(" %*$", got[2])

		-- rolled back: nothing
		assert(conn:exec("BEGIN"))
		append(conn, "nt-never")
		assert(conn:exec("ROLLBACK"))
		assert.same({}, payloads())
		l:close()
	end)

	it("needs no privilege beyond the append's own: an application role appends and is announced", function()
		local embedded = require "projhost.embedded"
		local admin = h.connect((embedded.admin_dsn(h.pg().home):gsub("dbname=%S+", "dbname=notify")))
		assert(admin:exec("DROP ROLE IF EXISTS nt_writer"))
		assert(admin:exec("CREATE ROLE nt_writer LOGIN"))
		assert(admin:exec("GRANT USAGE ON SCHEMA projhost TO nt_writer"))
		assert(admin:exec("GRANT SELECT, INSERT ON projhost.events TO nt_writer"))
		assert(admin:exec("GRANT SELECT, INSERT, UPDATE ON projhost.streams TO nt_writer"))
		local l = h.connect(dsn)
		assert(l:exec("LISTEN projhost"))
		local writer = h.connect((dsn:gsub("user=%S+", "user=nt_writer")))
		-- a commit that skips (another holds K) and one that notifies
		local other = h.connect(dsn)
		assert(other:query("SELECT pg_advisory_lock($1, $2)", CLASS, K))
		append(writer, "nt-app-1")
		assert(other:query("SELECT pg_advisory_unlock($1, $2)", CLASS, K))
		append(writer, "nt-app-2")
		local got = l:notifies(2)
		assert.equal(1, #got)
		assert.matches(" nt%-app%-2$", got[1].payload)
		assert.equal("2", scalar(conn, "SELECT count(*) FROM projhost.events WHERE stream_id LIKE 'nt-app-%'"))
		writer:close()
		other:close()
		l:close()
		assert(admin:exec("DROP OWNED BY nt_writer"))
		assert(admin:exec("DROP ROLE nt_writer"))
		admin:close()
	end)

	it("is skipped while another commit notifies, and counted", function()
		local l = h.connect(dsn)
		assert(l:exec("LISTEN projhost"))
		local other = h.connect(dsn)
		-- what a notifying commit holds until it ends
		assert(other:query("SELECT pg_advisory_lock($1, $2)", CLASS, K))
		local before = skips(conn)
		append(conn, "nt-skipped")
		assert.same({}, l:notifies(1))
		assert.equal(before + 1, skips(conn))
		assert(other:query("SELECT pg_advisory_unlock($1, $2)", CLASS, K))
		append(conn, "nt-heard")
		local got = l:notifies(2)
		assert.equal(1, #got)
		assert.matches(" nt%-heard$", got[1].payload)
		l:close()
		other:close()
	end)

	it("of a skipped append is made up for by the host once it has committed", function()
		local dir = h.tmpdir()
		h.write_file(dir .. "/parts.lua", PARTS)
		h.write_file(dir .. "/all.lua", ALL)
		-- a commit that goes on for a while after its NOTIFY decision: a
		-- deferred trigger that runs after projhost's ("wake" < "zz_slow")
		assert(conn:exec([[CREATE FUNCTION public.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN
				IF current_setting('test.slow', true) = 'on' THEN PERFORM pg_sleep(3); END IF;
				RETURN NULL;
			END $$]]))
		assert(conn:exec([[CREATE CONSTRAINT TRIGGER zz_slow AFTER UPDATE ON projhost.streams
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.slow_commit()]]))
		assert(conn:exec("CREATE TABLE nt_applied (who text, stream text, version bigint, PRIMARY KEY (who, stream, version))"))
		append(conn, "nt-0")
		-- the fallback poll is 10 minutes away: only wake-ups count
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_POLL_INTERVAL = "600" } })
		local function applied(who, stream)
			return tonumber(scalar(conn, "SELECT count(*) FROM nt_applied WHERE who = $1 AND stream = $2",
				who, stream)) or 0
		end
		local function both(stream, what)
			local ok, err = pcall(h.wait_until, function()
				return applied("parts", stream) == 1 and applied("all", stream) == 1
			end, 30, what)
			if not ok then error(err .. "\n" .. host:output()) end
		end
		both("nt-0", "the first event applied")
		-- its discovery rounds end (one that found a stream looks again)
		require("projhost.core").sleep(2)

		-- 1. a skipper that committed before the notification came
		local holder = h.connect(dsn)
		assert(holder:query("SELECT pg_advisory_lock($1, $2)", CLASS, K))
		append(conn, "nt-quiet")
		assert(holder:query("SELECT pg_advisory_unlock($1, $2)", CLASS, K))
		require("projhost.core").sleep(1)
		assert.equal(0, applied("parts", "nt-quiet"), "applied with no wake-up at all?")
		append(conn, "nt-loud")
		both("nt-loud", "the notified event applied")
		both("nt-quiet", "the skipped event applied")

		-- 2. a skipper still committing when the notification comes
		local slow = h.connect(dsn)
		assert(holder:query("SELECT pg_advisory_lock($1, $2)", CLASS, K))
		local before = skips(conn)
		assert(slow:exec("BEGIN"))
		assert(slow:exec("SET LOCAL test.slow = 'on'"))
		append(slow, "nt-slow")
		assert(slow:pipeline(true))
		slow:send("COMMIT")
		assert(slow:flush())
		h.wait_until(function() return skips(conn) == before + 1 end, 10, "the slow commit skipped its NOTIFY")
		assert(holder:query("SELECT pg_advisory_unlock($1, $2)", CLASS, K))
		append(conn, "nt-cover")
		both("nt-cover", "the covering event applied")
		-- the host must not have given up on the skipper meanwhile
		both("nt-slow", "the slow skipped event applied after its commit")
		assert(slow:sync())
		assert(slow:pipeline(false))
		slow:close()
		holder:close()
		host:kill(15)
		assert.equal(0, host:wait(30), host:output())
	end)

	it("wakes two hosts for a skipped append, a slow skipper included", function()
		-- each host keeps its own epochs (wake_check): a skip must wake
		-- both, whichever of them starts the newer epoch first
		local da, db = h.tmpdir(), h.tmpdir()
		h.write_file(da .. "/parts.lua", PARTS)
		h.write_file(db .. "/parts.lua", PARTS) -- the same projection: its partitions shared
		h.write_file(da .. "/all.lua", (ALL:gsub("'all'", "'a'"):gsub('"everything"', '"ev_a"')))
		h.write_file(db .. "/all.lua", (ALL:gsub("'all'", "'b'"):gsub('"everything"', '"ev_b"')))
		assert(conn:exec([[CREATE FUNCTION public.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN
				IF current_setting('test.slow', true) = 'on' THEN PERFORM pg_sleep(3); END IF;
				RETURN NULL;
			END $$]]))
		assert(conn:exec([[CREATE CONSTRAINT TRIGGER zz_slow AFTER UPDATE ON projhost.streams
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.slow_commit()]]))
		assert(conn:exec("CREATE TABLE nt_applied (who text, stream text, version bigint, PRIMARY KEY (who, stream, version))"))
		append(conn, "nt-0")
		local env = { env = { PROJHOST_POLL_INTERVAL = "600" } }
		local hosts = { h.spawn({ "run", "--db", dsn, da }, env), h.spawn({ "run", "--db", dsn, db }, env) }
		local function output()
			return hosts[1]:output() .. "\n----\n" .. hosts[2]:output()
		end
		local function applied(who, stream)
			return tonumber(scalar(conn, "SELECT count(*) FROM nt_applied WHERE who = $1 AND stream = $2",
				who, stream)) or 0
		end
		local function everywhere(stream, what)
			local ok, err = pcall(h.wait_until, function()
				return applied("a", stream) == 1 and applied("b", stream) == 1 and applied("parts", stream) == 1
			end, 30, what)
			if not ok then error(err .. "\n" .. output()) end
		end
		everywhere("nt-0", "the first event applied by both hosts")
		require("projhost.core").sleep(2)

		local holder = h.connect(dsn)
		assert(holder:query("SELECT pg_advisory_lock($1, $2)", CLASS, K))
		local before = skips(conn)
		append(conn, "nt-quiet")
		assert.equal(before + 1, skips(conn))
		assert(holder:query("SELECT pg_advisory_unlock($1, $2)", CLASS, K))
		require("projhost.core").sleep(1)
		assert.equal(0, applied("a", "nt-quiet") + applied("b", "nt-quiet"), "applied with no wake-up at all?")
		append(conn, "nt-loud")
		everywhere("nt-loud", "the notified event applied")
		everywhere("nt-quiet", "the skipped event applied by both hosts")

		-- a skipper still committing while both hosts hear a notification
		local slow = h.connect(dsn)
		assert(holder:query("SELECT pg_advisory_lock($1, $2)", CLASS, K))
		before = skips(conn)
		assert(slow:exec("BEGIN"))
		assert(slow:exec("SET LOCAL test.slow = 'on'"))
		append(slow, "nt-slow")
		assert(slow:pipeline(true))
		slow:send("COMMIT")
		assert(slow:flush())
		h.wait_until(function() return skips(conn) == before + 1 end, 10, "the slow commit skipped its NOTIFY")
		assert(holder:query("SELECT pg_advisory_unlock($1, $2)", CLASS, K))
		append(conn, "nt-cover")
		everywhere("nt-cover", "the covering event applied")
		everywhere("nt-slow", "the slow skipped event applied by both hosts after its commit")
		assert(slow:sync())
		assert(slow:pipeline(false))
		slow:close()
		holder:close()
		for _, p in ipairs(hosts) do p:kill(15) end
		for _, p in ipairs(hosts) do assert.equal(0, p:wait(30), output()) end
	end)
end)
