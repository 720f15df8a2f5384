-- The embedded default cluster (`projhost db ...`) and DSN resolution
-- (design §4: --db, PROJHOST_DB, libpq variables, embedded).
local h = require "helpers"
local embedded = require "projhost.embedded"
local lfs = require "lfs"

local PG_OPTS = h.PG_OPTS

local exists = h.exists

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

	it("the role of url is not a superuser, owns the database, and only the owner reaches the socket", function()
		local _, out = h.run({ "db", "url" }, { env = env })
		local conn = h.connect(out:match("^(.-)%s*$"))
		local r = conn:query([[SELECT current_setting('is_superuser') AS su,
			(SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()) AS owner,
			current_setting('unix_socket_permissions') AS mode]])[1]
		conn:close()
		assert.same({ su = "off", owner = "projhost", mode = "0700" }, r)
		assert.equal("rwx------", lfs.attributes(home .. "/run", "permissions"))
		assert.equal("rwx------", lfs.attributes(home .. "/run/.s.PGSQL.5432", "permissions"))
		assert.equal("rwx------", lfs.attributes(home .. "/log", "permissions"))
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

	it("upgrades a cluster made by an older projhost in place (superuser role projhost)", function()
		local old = h.tmpdir() .. "/old"
		local oenv = { PROJHOST_HOME = old, PROJHOST_PG_OPTS = PG_OPTS }
		local root = io.popen("id -u"):read("*l") == "0"
		-- what the previous embedded.lua did: initdb -U projhost (the
		-- bootstrap superuser), trust, socket in run/ with the default mode
		local as = root and "runuser -u nobody -- " or ""
		lfs.mkdir(old)
		local function sh(cmd)
			local ok = os.execute(cmd .. " >>'" .. old .. "/setup.log' 2>&1")
			if ok ~= true and ok ~= 0 then error(cmd .. "\n" .. h.read_file(old .. "/setup.log")) end
		end
		sh("mkdir -p '" .. old .. "/data' '" .. old .. "/run' '" .. old .. "/log'")
		if root then sh("chown nobody '" .. old .. "/data' '" .. old .. "/run' '" .. old .. "/log'") end
		sh("cd '" .. old .. "' && " .. as .. "'" .. h.pgbin("initdb") .. "' -D '" .. old .. "/data' -U projhost "
			.. "--auth=trust -E UTF8 --locale=C --no-instructions")
		sh("cd '" .. old .. "' && " .. as .. "'" .. h.pgbin("pg_ctl") .. "' -D '" .. old .. "/data' -l '" .. old
			.. "/log/postgresql.log' -w -o \"-c listen_addresses='' -k '" .. old .. "/run' -p 5432 " .. PG_OPTS
			.. "\" start")
		-- a failing assertion must not leave the old cluster running
		finally(function() h.run({ "db", "stop" }, { env = oenv }) end)
		local function dsn_as(user, db)
			return ("host=%s/run port=5432 dbname=%s user=%s"):format(old, db, user)
		end
		local c = h.connect(dsn_as("projhost", "postgres"))
		assert(c:exec("CREATE DATABASE projhost"))
		c:close()
		c = h.connect(dsn_as("projhost", "projhost"))
		assert.equal("on", h.scalar(c, "SELECT current_setting('is_superuser')"))
		assert(require("projhost.schema").migrate(c))
		for _, sql in ipairs({
			"CREATE TABLE model (id text PRIMARY KEY, n int)",
			"CREATE TABLE counter (id serial PRIMARY KEY, at bigint GENERATED ALWAYS AS IDENTITY)",
			"CREATE SEQUENCE free_seq",
			"CREATE VIEW model_view AS SELECT * FROM model",
			"CREATE MATERIALIZED VIEW model_mat AS SELECT * FROM model",
			"CREATE TYPE mood AS ENUM ('ok')",
			"CREATE TYPE pair AS (a int, b int)",
			"CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
			"CREATE FUNCTION twice(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2'",
			"CREATE PROCEDURE noop() LANGUAGE sql AS 'SELECT 1'",
			"CREATE SCHEMA mine",
			"CREATE TABLE mine.t (x int)",
			"SELECT projhost.append('old-1', NULL, '[{\"type\":\"A\"},{\"type\":\"B\"}]')",
			"INSERT INTO model VALUES ('a', 1)",
		}) do assert(c:exec(sql)) end
		c:close()

		-- the next start, with the old cluster still running
		local code, out, err = h.run({ "db", "start" }, { env = oenv })
		assert.equal(0, code, out .. err)
		assert.equal("the embedded PostgreSQL in " .. old .. " is already running\n", out)
		local _, url = h.run({ "db", "url" }, { env = oenv })
		assert.equal(dsn_as("projhost", "projhost") .. "\n", url)
		local function check()
			c = h.connect(dsn_as("projhost", "projhost"))
			local r = c:query([[SELECT current_setting('is_superuser') AS su,
				(SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()) AS owner,
				(SELECT rolsuper::text FROM pg_roles WHERE oid = 10) AS bootstrap_super,
				(SELECT rolname FROM pg_roles WHERE oid = 10) AS bootstrap,
				(SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname !~ '^pg_') AS roles]])[1]
			assert.same({ su = "off", owner = "projhost", bootstrap_super = "true", bootstrap = "projhost_admin",
				roles = "projhost,projhost_admin" }, r)
			-- everything the old superuser made in the database is the role's now
			local foreign = c:query([[
				SELECT 'schema ' || nspname AS o FROM pg_namespace
				WHERE nspowner NOT IN (current_user::regrole, 'pg_database_owner'::regrole)
					AND nspname !~ '^(pg_|information_schema$)'
				UNION ALL SELECT 'relation ' || c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
				WHERE relowner <> current_user::regrole AND nspname !~ '^(pg_|information_schema$)'
				UNION ALL SELECT 'routine ' || p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
				WHERE proowner <> current_user::regrole AND nspname !~ '^(pg_|information_schema$)'
				UNION ALL SELECT 'type ' || t.oid::regtype FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
				WHERE typowner <> current_user::regrole AND nspname !~ '^(pg_|information_schema$)']])
			assert.same({}, foreign)
			assert(c:exec("INSERT INTO model VALUES ('b', 2) ON CONFLICT (id) DO UPDATE SET n = model.n + 1"))
			assert(c:exec("INSERT INTO counter DEFAULT VALUES"))
			assert(c:exec("REFRESH MATERIALIZED VIEW model_mat"))
			assert(c:exec("INSERT INTO mine.t VALUES (1)"))
			assert.equal("4", h.scalar(c, "SELECT twice(2)::text"))
			local ok, _, sqlstate = c:exec("COPY (SELECT 1) TO PROGRAM 'true'")
			assert.is_nil(ok)
			assert.equal("42501", sqlstate)
			c:close()
		end
		check()
		code, out, err = h.run({ "append", "old-1", "C", "--expected-version", "2" }, { env = oenv })
		assert.equal(0, code, err)
		assert.equal("3\n", out)
		assert.equal("rwx------", lfs.attributes(old .. "/run", "permissions"))

		-- after a restart the settings are in effect too, and a second
		-- upgrade finds nothing to do
		assert.equal(0, (h.run({ "db", "stop" }, { env = oenv })))
		code, out, err = h.run({ "db", "start" }, { env = oenv })
		assert.equal(0, code, out .. err)
		assert.equal("rwx------", lfs.attributes(old .. "/run/.s.PGSQL.5432", "permissions"))
		check()
	end)

	it("refuses a home libpq cannot name (a comma or a control character) in one line", function()
		for _, bad in ipairs({ h.tmpdir() .. "/a,b", h.tmpdir() .. "/a\nb" }) do
			local code, out, err = h.run({ "db", "start" }, { env = { PROJHOST_HOME = bad } })
			assert.equal(1, code)
			assert.equal("", out)
			assert.equal("projhost: db start: the embedded home's path holds a comma or a control character, "
				.. "which libpq cannot take as a socket directory: set PROJHOST_HOME to another directory\n", err)
			assert.is_false(exists(bad))
		end
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
		assert.matches('"projections": %[', out)
		local run = pg.dsn:match("host=(%S+)")
		code, out, err = h.run({ "status", "--json" },
			{ env = { PROJHOST_HOME = home, PGHOST = run, PGUSER = "projhost", PGDATABASE = "projhost" } })
		assert.equal(0, code, err)
		assert.matches('"projections": %[', out)
		assert.is_false(exists(home))
	end)

	it("an unreachable server fails in one line naming host and port", function()
		local code, out, err = h.run({ "status", "--db", "host=127.0.0.1 port=1 connect_timeout=2" })
		assert.equal(1, code)
		assert.equal("", out)
		assert.matches("^projhost: status: [^\n]*127%.0%.0%.1[^\n]*port 1[^\n]*\n$", err)
	end)
end)
