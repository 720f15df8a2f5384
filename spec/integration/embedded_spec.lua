-- The embedded default cluster (`projhost db ...`) and DSN resolution
-- (design §4: --db, PROJHOST_DB, libpq variables, embedded).
local h = require "helpers"
local embedded = require "projhost.embedded"
local lfs = require "lfs"

local PG_OPTS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"

local function exists(path)
	return lfs.attributes(path, "mode") ~= nil
end

describe("projhost db", function()
	local home, env

	setup(function()
		home = h.tmpdir() .. "/home"
		env = { PROJHOST_HOME = home, PROJHOST_PG_OPTS = PG_OPTS }
	end)

	teardown(function()
		h.run({ "db", "stop" }, { env = env })
	end)

	it("url prints the DSN of the home without starting anything", function()
		local code, out = h.run({ "db", "url" }, { env = env })
		assert.equal(0, code)
		assert.equal(("host=%s/run port=5432 dbname=projhost user=projhost\n"):format(home), out)
		assert.is_false(exists(home .. "/data"))
	end)

	it("start initialises and starts the cluster, and is idempotent", function()
		local code, out, err = h.run({ "db", "start" }, { env = env })
		assert.equal(0, code, err)
		assert.equal("started the embedded PostgreSQL in " .. home .. "\n", out)
		assert.is_true(exists(home .. "/data/PG_VERSION"))
		assert.is_true(exists(home .. "/run/.s.PGSQL.5432"))
		assert.is_true(exists(home .. "/log/postgresql.log"))
		code, out = h.run({ "db", "start" }, { env = env })
		assert.equal(0, code)
		assert.equal("the embedded PostgreSQL in " .. home .. " is already running\n", out)
	end)

	it("url connects as projhost to database projhost, over the socket only", function()
		local _, out = h.run({ "db", "url" }, { env = env })
		local conn = h.connect(out:match("^(.-)%s*$"))
		local r = conn:query("SELECT current_user AS u, current_database() AS d, "
			.. "current_setting('listen_addresses') AS l, current_setting('fsync') AS f")[1]
		conn:close()
		assert.same({ u = "projhost", d = "projhost", l = "", f = "off" }, r)
	end)

	it("commands without --db use (and migrate) the embedded cluster", function()
		local code, out, err = h.run({ "append", "emb-1", "Created" }, { env = env })
		assert.equal(0, code, err)
		assert.equal("1\n", out)
		assert.equal("", err)
		local conn = h.connect(embedded.dsn(home))
		local r = conn:query("SELECT count(*) AS n FROM projhost.events WHERE stream_id = 'emb-1'")[1]
		conn:close()
		assert.equal("1", r.n)
	end)

	it("db psql passes its arguments to psql", function()
		local code, out, err = h.run({ "db", "psql", "-Atc", "SELECT 40 + 2" }, { env = env })
		assert.equal(0, code, err)
		assert.equal("42\n", out)
	end)

	it("stop stops it, twice is fine, and start again survives a stale postmaster.pid", function()
		local code, out = h.run({ "db", "stop" }, { env = env })
		assert.equal(0, code)
		assert.equal("stopped the embedded PostgreSQL in " .. home .. "\n", out)
		assert.is_nil(require("projhost.core").connect(embedded.dsn(home)))
		code, out = h.run({ "db", "stop" }, { env = env })
		assert.equal(0, code)
		assert.equal("the embedded PostgreSQL in " .. home .. " is not running\n", out)

		-- a crash leaves postmaster.pid behind, naming a process that is gone
		h.write_file(home .. "/data/postmaster.pid", "4000000\n" .. home .. "/data\n1700000000\n5432\n")
		local err
		code, out, err = h.run({ "db", "start" }, { env = env })
		assert.equal(0, code, err)
		assert.equal("started the embedded PostgreSQL in " .. home .. "\n", out)
		local conn = h.connect(embedded.dsn(home))
		assert.equal("1", conn:query("SELECT count(*) AS n FROM projhost.events")[1].n)
		conn:close()
	end)

	it("two first starts at once both succeed (one initdb)", function()
		local other = { PROJHOST_HOME = h.tmpdir() .. "/twin", PROJHOST_PG_OPTS = PG_OPTS }
		local a = h.spawn({ "db", "start" }, { env = other })
		local b = h.spawn({ "db", "start" }, { env = other })
		local ca, cb = a:wait(60), b:wait(60)
		h.run({ "db", "stop" }, { env = other })
		assert.equal(0, ca, a:output())
		assert.equal(0, cb, b:output())
		local both = a:output() .. b:output()
		assert.matches("started the embedded PostgreSQL", both)
		assert.matches("is already running", both)
	end)

	it("says so in one line when nobody cannot reach the home (as root)", function()
		if io.popen("id -u"):read("*l") ~= "0" then
			pending("only meaningful as root: PostgreSQL then runs as nobody")
			return
		end
		local parent = h.tmpdir()
		os.execute("chmod 700 '" .. parent .. "'")
		local code, out, err = h.run({ "db", "start" }, { env = { PROJHOST_HOME = parent .. "/h" } })
		assert.equal(1, code)
		assert.equal("", out)
		assert.equal(("projhost: db start: user nobody (who runs PostgreSQL when projhost runs as root) cannot "
			.. "reach %s/h: set PROJHOST_HOME to a directory every user can enter, e.g. /tmp/projhost\n"):format(parent), err)
	end)
end)

describe("database resolution", function()
	local function getenv(t) return function(k) return t[k] end end

	it("prefers --db, then PROJHOST_DB, then libpq's variables", function()
		local all = { PROJHOST_DB = "dbname=fromenv", PGHOST = "/x" }
		assert.same({ "dbname=flag", false }, { embedded.resolve{ db = "dbname=flag", getenv = getenv(all) } })
		assert.same({ "dbname=fromenv", false }, { embedded.resolve{ getenv = getenv(all) } })
		for _, var in ipairs({ "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE" }) do
			assert.same({ "", false }, { embedded.resolve{ getenv = getenv({ [var] = "x" }) } })
		end
	end)

	it("PROJHOST_DB and libpq variables never touch the embedded home", function()
		local pg = h.pg()
		local home = h.tmpdir() .. "/unused"
		local code, out, err = h.run({ "status", "--json" }, { env = { PROJHOST_HOME = home, PROJHOST_DB = pg.dsn } })
		assert.equal(0, code, err)
		assert.matches('^{"projections":%[', out)
		local run = pg.dsn:match("host=(%S+)")
		code, out, err = h.run({ "status", "--json" },
			{ env = { PROJHOST_HOME = home, PGHOST = run, PGUSER = "projhost", PGDATABASE = "projhost" } })
		assert.equal(0, code, err)
		assert.matches('^{"projections":%[', out)
		assert.is_false(exists(home))
	end)

	it("an unreachable server fails in one line naming host and port", function()
		local code, out, err = h.run({ "status", "--db", "host=127.0.0.1 port=1 connect_timeout=2" })
		assert.equal(1, code)
		assert.equal("", out)
		assert.matches("^projhost: status: [^\n]*127%.0%.0%.1[^\n]*port 1[^\n]*\n$", err)
	end)
end)
