-- Several partitioned and unpartitioned projections in one host (and in
-- two hosts at once): each catches up a backlog and follows live appends,
-- and `run --once` ends. (Two partitioned projections used to push each
-- other's partition discovery back for ever.)
local h = require "helpers"
local scalar = h.scalar

-- A projection counting events per stream into <name>_count, one row per
-- applied event in <name>_applied under a unique key (an event applied
-- twice fails the batch).
local function projection(name, from, partitioned)
	return string.format([[
return {
	name = %q,
	from = %s,
	%s
	setup = {
		"CREATE TABLE IF NOT EXISTS %s_count (stream text PRIMARY KEY, n bigint NOT NULL)",
		"CREATE TABLE IF NOT EXISTS %s_applied (stream text, version bigint, PRIMARY KEY (stream, version))",
	},
	when = {
		["*"] = function(s, e, ctx)
			ctx:exec("INSERT INTO %s_count VALUES ($1, 1) ON CONFLICT (stream) DO UPDATE SET n = %s_count.n + 1", e.stream)
			ctx:exec("INSERT INTO %s_applied VALUES ($1, $2)", e.stream, e.version)
		end,
	},
	on_error = function() return "fail" end,
}
]], name, from, partitioned and 'partition = "stream",' or "", name, name, name, name, name)
end

local PROJS = {
	{ "pa", '{ category = "ca" }', true, "ca-%" },
	{ "pb", '{ category = "cb" }', true, "cb-%" },
	{ "pall", "{ all = true }", true, "%" },
	{ "ua", '{ category = "ca" }', false, "ca-%" },
	{ "ub", '{ category = "cb" }', false, "cb-%" },
	{ "uall", "{ all = true }", false, "%" },
}

local function write_projections(dir)
	for _, p in ipairs(PROJS) do
		h.write_file(dir .. "/" .. p[1] .. ".lua", projection(p[1], p[2], p[3]))
	end
end

local function counts(conn, name)
	return assert(conn:query("SELECT stream, n::text AS n FROM " .. name .. "_count ORDER BY 1"))
end

local function truth(conn, like)
	return assert(conn:query([[SELECT stream_id AS stream, count(*)::text AS n
		FROM projhost.events WHERE stream_id LIKE $1 GROUP BY 1 ORDER BY 1]], like))
end

local function total(conn)
	return tonumber(scalar(conn, "SELECT count(*) FROM projhost.events"))
end

local function applied(conn, name)
	return tonumber(scalar(conn, "SELECT count(*) FROM " .. name .. "_applied"))
end

local function assert_matches_truth(conn)
	for _, p in ipairs(PROJS) do
		local t = truth(conn, p[4])
		assert.is_true(#t > 0, p[1])
		assert.same(t, counts(conn, p[1]), p[1])
	end
	assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status <> 'running'"))
end

local function all_applied(conn)
	local n = total(conn)
	return applied(conn, "pall") == n and applied(conn, "uall") == n
		and applied(conn, "pa") == applied(conn, "ua")
		and applied(conn, "pb") == applied(conn, "ub")
		and applied(conn, "pa") + applied(conn, "pb") == n
end

describe("many projections in one host", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("multi")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		write_projections(dir)
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	it("three partitioned and three unpartitioned catch up a backlog with --once", function()
		-- the schema first (insert_events writes projhost.events directly)
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		h.insert_events(conn, "ca", 3000, 300)
		h.insert_events(conn, "cb", 1500, 150)
		code, out, err = h.run({ "run", "--once", "--workers", "2", "--db", dsn, dir }, { timeout = 90 })
		assert.equal(0, code, out .. err)
		assert.matches("pa caught up", err, 1, true)
		assert.matches("pb caught up", err, 1, true)
		assert.matches("pall caught up", err, 1, true)
		assert_matches_truth(conn)
		assert.equal(4500, applied(conn, "pall"))
		assert.equal(4500, applied(conn, "uall"))
	end)

	it("follow live appends in two hosts at once, then --once ends", function()
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		h.insert_events(conn, "ca", 1000, 100)
		h.insert_events(conn, "cb", 500, 50)
		local args = { "run", "--workers", "2", "--db", dsn, dir }
		local env = { PROJHOST_BATCH_SIZE = 7 }
		local hosts = { h.spawn(args, { env = env }), h.spawn(args, { env = env }) }
		h.wait_until(function() return all_applied(conn) end, 90, "the backlog applied")
		for i = 1, 150 do
			local stream = (i % 2 == 0 and "ca-" or "cb-") .. (i % 37)
			assert(conn:query("SELECT projhost.append($1, NULL, $2::jsonb)", stream, '[{"type":"Inc"}]'))
		end
		h.wait_until(function() return all_applied(conn) end, 90, "the live appends applied")
		for _, p in ipairs(hosts) do p:kill(15) end
		for _, p in ipairs(hosts) do assert.equal(0, p:wait(15), p:output()) end
		assert_matches_truth(conn)
		-- nothing left: another --once finds every projection caught up
		code, out, err = h.run({ "run", "--once", "--workers", "3", "--db", dsn, dir }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		assert_matches_truth(conn)
		assert.equal(1650, applied(conn, "pall"))
	end)

	it("runs with --workers far above what the process can run, clamped with a warning", function()
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		h.insert_events(conn, "ca", 300, 30)
		h.insert_events(conn, "cb", 100, 10)
		-- an open files limit of 100 leaves room for 18 workers (the CLI
		-- allows up to core.max_workers)
		local p = io.popen(string.format("ulimit -n 100 && '%s' run --once --workers 64 --db '%s' '%s' 2>&1; echo \"exit=$?\"",
			h.bin, dsn, dir))
		out = p:read("*a")
		p:close()
		assert.matches("exit=0", out, 1, true)
		assert.matches("64 workers asked for; starting 18, the most this process can run (open files limit 100", out, 1, true)
		assert.not_matches("internal error", out, 1, true)
		assert_matches_truth(conn)
	end)

	it("a partition waiting on a long retry delay does not stop the discovery of others", function()
		local d2 = h.tmpdir()
		h.write_file(d2 .. "/r.lua", [[
return {
	name = "r",
	from = { category = "r" },
	partition = "stream",
	setup = "CREATE TABLE IF NOT EXISTS r_applied (stream text, version bigint, PRIMARY KEY (stream, version))",
	when = {
		Inc = function(s, e, ctx) ctx:exec("INSERT INTO r_applied VALUES ($1, $2)", e.stream, e.version) end,
		Bad = function() error("not now") end,
	},
	on_error = function() return "retry", 3600 end,
}
]])
		local code, out, err = h.run({ "run", "--once", "--db", dsn, d2 }, { timeout = 60 })
		assert.equal(0, code, out .. err)
		local p = h.spawn({ "run", "--db", dsn, d2 })
		h.wait_until(function() return p:output():find("listening", 1, true) end, 30, "the host to listen")
		assert(conn:query([[SELECT projhost.append('r-a', NULL, '[{"type":"Bad"}]')]]))
		h.wait_until(function() return p:output():find("retry", 1, true) end, 30, "r-a to wait for its retry")
		-- no NOTIFY: only a discovery round (the fallback poll) finds it
		h.insert_events(conn, "r", 3, 1)
		h.wait_until(function()
			return tonumber(scalar(conn, "SELECT count(*) FROM r_applied WHERE stream = 'r-0'")) == 3
		end, 40, "r-0 found and applied")
		p:kill(15)
		assert.equal(0, p:wait(15), p:output())
	end)
end)
