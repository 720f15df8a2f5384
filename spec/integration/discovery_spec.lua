-- Partition discovery at scale (issue 11, "idle costs nothing"): a
-- caught-up host looks only at the streams that got events since its last
-- look, never walks all of them per poll, and still finds every stream
-- behind - events that came without a NOTIFY, events held back by an old
-- transaction, streams woken by an operator.
local h = require "helpers"
local scalar = h.scalar

local PCOUNT = [[
return {
	name = "pc",
	from = { category = "pc" },
	partition = "stream",
	setup = { "CREATE TABLE IF NOT EXISTS pc_applied (stream text, version bigint, PRIMARY KEY (stream, version))" },
	init = function() return { n = 0 } end,
	when = {
		Inc = function(s, e, ctx)
			s.n = s.n + 1
			ctx:exec("INSERT INTO pc_applied VALUES ($1, $2)", e.stream, e.version)
		end,
	},
}
]]

local STREAMS = 20000

-- Tuples read from projhost.streams by every backend so far (statistics of
-- ended sessions are in; a host's backend reports when it exits).
local function streams_read(conn)
	return tonumber(scalar(conn, [[SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
		FROM pg_stat_user_tables WHERE relid = 'projhost.streams'::regclass]]))
end

local function applied(conn)
	return tonumber(scalar(conn, "SELECT count(*) FROM pc_applied"))
end

-- fn() in a transaction with projhost's NOTIFY trigger off, as an import
-- by hand might write: no NOTIFY at all.
local function quietly(conn, fn)
	assert(conn:exec("BEGIN"))
	assert(conn:exec("ALTER TABLE projhost.streams DISABLE TRIGGER USER"))
	fn()
	assert(conn:exec("ALTER TABLE projhost.streams ENABLE TRIGGER USER"))
	assert(conn:exec("COMMIT"))
end

-- n events over streams pc-0 .. pc-(streams-1) after the ones there, with
-- their streams rows, in set-based SQL, quietly.
local function insert_quietly(conn, n, streams)
	quietly(conn, function()
		assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type)
			SELECT 'pc-' || (i % $2), coalesce((SELECT version FROM projhost.streams WHERE stream_id = 'pc-' || (i % $2)), 0)
				+ i / $2 + 1, 'Inc'
			FROM generate_series(0, $1 - 1) i]], n, streams))
		assert(conn:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			SELECT stream_id, max(stream_version), max(global_position) FROM projhost.events
			WHERE stream_id IN (SELECT 'pc-' || i FROM generate_series(0, $1 - 1) i) GROUP BY 1
			ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, last_position = EXCLUDED.last_position]],
			streams))
	end)
end

describe("partition discovery", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("discovery")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		h.write_file(dir .. "/pc.lua", PCOUNT)
		assert(require("projhost.schema").migrate(conn))
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("finds a category's streams in a database whose collation ignores punctuation", function()
		-- ICU with alternate=shifted sorts 'pc.' before 'pc-1' (the '-' and
		-- '.' are ignored at first): no key range of 'pc' to 'pc.' holds the
		-- category there (glibc's en_US.UTF-8 does the same)
		local admin = h.connect(h.pg().dsn)
		assert(admin:exec("DROP DATABASE IF EXISTS discovery_icu WITH (FORCE)"))
		assert(admin:exec([[CREATE DATABASE discovery_icu TEMPLATE template0 LOCALE_PROVIDER icu
			ICU_LOCALE 'und-u-ka-shifted' LOCALE 'C']]))
		admin:close()
		local idsn = dsn:gsub("dbname=%S+", "dbname=discovery_icu")
		local ic = h.connect(idsn)
		assert(require("projhost.schema").migrate(ic))
		assert.equal("t", scalar(ic, "SELECT 'pc.' < 'pc-1'")) -- the collation this case is about
		-- new short streams whose names sort one way byte by byte and another
		-- in this collation (case, punctuation): the walk catches each up
		-- itself, in chunks that are key ranges of the collation (a chunk
		-- sorted byte by byte left some out of its range read)
		assert(ic:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type)
			SELECT 'pc-z' || n, 1, 'Inc' FROM unnest($1::text[]) n]],
			"{B1,a2,.x,_y,Z,b,A-3,a-2,'q,Q,~z,9,10,1.5,-m,M_}"))
		assert(ic:exec([[INSERT INTO projhost.streams (stream_id, version, last_position)
			SELECT stream_id, 1, global_position FROM projhost.events WHERE stream_version = 1
			AND stream_id NOT IN (SELECT stream_id FROM projhost.streams)]]))
		local code, out, err = h.run({ "run", "--once", "--db", idsn, dir }, { env = { PROJHOST_DEBUG = "1" } })
		assert.equal(0, code, out .. err)
		assert.equal(16, applied(ic))
		assert.truthy((out .. err):find("discovery caught up 16 of 16 new partitions", 1, true), out .. err)
		insert_quietly(ic, 300, 30)
		assert(ic:exec("INSERT INTO projhost.events (stream_id, stream_version, event_type) VALUES ('pcx-1', 1, 'Inc')"))
		assert.equal(0, (h.run({ "run", "--once", "--db", idsn, dir })))
		assert.equal(316, applied(ic))
		assert.equal("46", scalar(ic, "SELECT count(*) FROM projhost.checkpoints WHERE projection = 'pc' AND partition <> ''"))
		ic:close()
	end)

	it("of a caught-up host does not walk the streams on every poll", function()
		insert_quietly(conn, STREAMS, STREAMS)
		assert.equal(0, (h.run({ "run", "--once", "--db", dsn, dir })))
		assert.equal(STREAMS, applied(conn))
		local before = streams_read(conn)
		-- a poll every 0.2 s for 4 s: twenty looks
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_POLL_INTERVAL = "0.2" } })
		h.wait_until(function() return host:output():find("serving 1 projection", 1, true) end, 20, "host up")
		require("projhost.core").sleep(4)
		-- one event still gets through, found by a look (no NOTIFY)
		insert_quietly(conn, 1, 1)
		local ok, e = pcall(h.wait_until, function() return applied(conn) == STREAMS + 1 end, 20, "the new event applied")
		if not ok then error(e .. "\n" .. host:output() .. "\n" .. applied(conn)) end
		host:kill(15)
		assert.equal(0, host:wait(15), host:output())
		-- its first look walks every stream once (it starts without
		-- knowing where the last host stopped); then windows of events
		local read = streams_read(conn) - before
		assert.is_true(read < 2 * STREAMS, ("the host read %d rows of projhost.streams (%d streams)"):format(read, STREAMS))
	end)

	it("finds streams behind that came without a NOTIFY, and ones an old transaction held back", function()
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_POLL_INTERVAL = "0.3" } })
		h.wait_until(function() return host:output():find("caught up", 1, true) end, 20, "caught up")
		insert_quietly(conn, 300, 100)
		-- names a store from before the stream name rule may hold (set-based
		-- SQL bypasses it): they travel in discovery's tokens and answers
		for _, name in ipairs({ "pc-tab\there", "pc-line\nbreak", "pc-sp ace\\ \"q\"" }) do
			quietly(conn, function()
				assert(conn:exec([[INSERT INTO projhost.events (stream_id, stream_version, event_type)
					VALUES ($1, 1, 'Inc'), ($1, 2, 'Inc')]], name))
				assert(conn:exec("INSERT INTO projhost.streams (stream_id, version, last_position) VALUES ($1, 2, 0)", name))
			end)
		end
		h.wait_until(function() return applied(conn) == 306 end, 20, "306 events applied")
		-- an old transaction holds the horizon while newer events commit:
		-- the window must not step past them
		local old = h.connect(dsn)
		assert(old:exec("BEGIN"))
		assert(old:exec("SELECT pg_current_xact_id()"))
		insert_quietly(conn, 50, 50)
		require("projhost.core").sleep(1)
		assert(old:exec("COMMIT"))
		old:close()
		h.wait_until(function() return applied(conn) == 356 end, 20, "the held events applied")
		-- and an operator's wake-up (resume) walks all streams again
		assert(conn:exec("UPDATE projhost.checkpoints SET status = 'paused' WHERE projection = 'pc' AND partition = 'pc-3'"))
		insert_quietly(conn, 100, 100)
		h.wait_until(function() return applied(conn) == 455 end, 20, "all but the paused stream")
		assert.equal(0, (h.run({ "resume", "pc", "--db", dsn })))
		h.wait_until(function() return applied(conn) == 456 end, 20, "the resumed stream")
		host:kill(15)
		assert.equal(0, host:wait(15), host:output())
		assert.equal("0", scalar(conn, [[SELECT count(*) FROM projhost.checkpoints c
			JOIN projhost.streams s ON s.stream_id = c.partition
			WHERE c.projection = 'pc' AND c.last_pos <> s.version]]))
	end)
end)
