-- The security model (README "Security model", issue 10): the embedded
-- default's role is not a superuser, other local OS users cannot reach the
-- cluster, no path is handed to a shell, and a superuser given with --db is
-- warned about.
--
-- Everything here runs in one embedded home whose path holds shell syntax,
-- quotes and spaces: every command below must use it literally.
local h = require "helpers"
local core = require "projhost.core"
local embedded = require "projhost.embedded"
local lfs = require "lfs"

local PG_OPTS = h.PG_OPTS

local exists = h.exists

local function is_root()
	local p = io.popen("id -u")
	local uid = p:read("*l")
	p:close()
	return uid == "0"
end

-- A path under /tmp that no one has created (yet).
local function marker(tag)
	math.randomseed(core.monotime() * 1e6)
	local m
	repeat m = ("/tmp/ph%s-%06d"):format(tag, math.random(0, 999999)) until not exists(m)
	return m
end

describe("security", function()
	local home, env, mark, dsn, conn

	setup(function()
		mark = marker("x")
		-- sun_path holds 107 bytes: <tmp>/<this>/run/.s.PGSQL.5432 must fit
		home = h.tmpdir() .. ("/a 'q\" $(touch %s)"):format(mark)
		env = { PROJHOST_HOME = home, PROJHOST_PG_OPTS = PG_OPTS }
		local code, out, err = h.run({ "db", "start" }, { env = env })
		assert.equal(0, code, out .. err)
		local _
		code, out, _ = h.run({ "db", "url" }, { env = env })
		assert.equal(0, code)
		dsn = out:match("^(.-)%s*$")
		conn = h.connect(dsn)
	end)

	teardown(function()
		if conn then conn:close() end
		h.stop_all()
		h.run({ "db", "stop" }, { env = env })
		os.remove(mark)
	end)

	it("uses a PROJHOST_HOME with $(...), quotes and spaces literally", function()
		assert.is_false(exists(mark), "a shell ran the command in the path")
		assert.is_true(exists(home .. "/data/PG_VERSION"))
		assert.is_true(exists(home .. "/run/.s.PGSQL.5432"))
		local admin = h.connect(embedded.admin_dsn(home))
		assert.equal(home .. "/data", h.scalar(admin, "SELECT current_setting('data_directory')"))
		-- one element of a list, double-quoted
		assert.equal('"' .. (home .. "/run"):gsub('"', '""') .. '"',
			h.scalar(admin, "SELECT current_setting('unix_socket_directories')"))
		admin:close()
		-- run resolves its relative paths without a shell too
		local dir = home .. "/projections"
		lfs.mkdir(dir)
		h.write_file(dir .. "/noop.lua", [[return { from = { category = "noop" }, when = { ["*"] = function() end } }]])
		local code, out, err = h.run({ "run", "--once", "projections" }, { env = env, cwd = home })
		assert.equal(0, code, out .. err)
		assert.matches("noop pos=0 caught up", out .. err, 1, true)
		assert.is_false(exists(mark))
	end)

	it("runs projection SQL as a role that is not a superuser and owns its database", function()
		local r = conn:query([[SELECT current_user AS u, current_setting('is_superuser') AS su,
			(SELECT rolsuper::text FROM pg_roles WHERE rolname = current_user) AS rolsuper,
			(SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()) AS owner]])[1]
		assert.same({ u = "projhost", su = "off", rolsuper = "false", owner = "projhost" }, r)
		-- and it can still do what projections and the host need
		assert(conn:exec("CREATE TABLE IF NOT EXISTS sec_model (id text PRIMARY KEY)"))
		assert(conn:exec("DROP TABLE sec_model"))
	end)

	it("refuses COPY TO PROGRAM, pg_read_file and ALTER SYSTEM to that role with 42501", function()
		local copy_mark = marker("c")
		local cases = {
			{ "COPY (SELECT 1) TO PROGRAM 'touch " .. copy_mark .. "'", "pg_execute_server_program" },
			{ "SELECT pg_read_file('/etc/passwd')", "permission denied for function pg_read_file" },
			{ "COPY (SELECT 1) TO '" .. copy_mark .. "'", "pg_write_server_files" },
			{ "ALTER SYSTEM SET work_mem = '1MB'", "permission denied to set parameter" },
			{ "CREATE ROLE intruder SUPERUSER", "must be superuser" },
		}
		for _, c in ipairs(cases) do
			local ok, msg, code = conn:exec(c[1])
			assert.is_nil(ok, c[1])
			assert.equal("42501", code, c[1] .. ": " .. tostring(msg))
			assert.matches(c[2], msg, 1, true)
		end
		assert.is_false(exists(copy_mark))
	end)

	it("a handler doing COPY TO PROGRAM under the embedded default fails with 42501 and runs nothing", function()
		local copy_mark = marker("h")
		local dir = h.tmpdir()
		h.write_file(dir .. "/evil.lua", ([[
return {
	from = { category = "evil" },
	when = {
		["*"] = function(s, e, ctx)
			ctx:exec("COPY (SELECT 1) TO PROGRAM 'touch %s'")
		end,
	},
	on_error = function() return "park" end,
}
]]):format(copy_mark))
		local code, out, err = h.run({ "append", "evil-1", "Go" }, { env = env })
		assert.equal(0, code, err)
		-- no --db: the embedded default of this home
		code, out, err = h.run({ "run", "--once", dir }, { env = env })
		assert.equal(0, code, out .. err)
		assert.matches("pg_execute_server_program", out .. err, 1, true)
		assert.is_false(exists(copy_mark), "COPY TO PROGRAM ran")
		local parked = assert(conn:query("SELECT error FROM projhost.parked WHERE projection = 'evil'"))
		assert.equal(1, #parked)
		assert.matches("pg_execute_server_program", parked[1].error, 1, true)
		-- no superuser WARN for the embedded role
		assert.is_nil((out .. err):find("connects as superuser", 1, true))
	end)

	it("keeps other local OS users from connecting (socket directory and socket mode 0700)", function()
		assert.equal("rwx------", lfs.attributes(home .. "/run", "permissions"))
		assert.equal("rwx------", lfs.attributes(home .. "/run/.s.PGSQL.5432", "permissions"))
		if not is_root() then
			pending("connecting as another OS user needs root (setpriv); checked the modes only")
			return
		end
		-- `daemon` is neither us nor `nobody` (who runs the cluster when we are root)
		local psql = embedded.psql_path()
		local out = h.tmpdir() .. "/psql.out"
		local function as_daemon()
			local pid = require("projhost.proc").spawn("/usr/bin/setpriv",
				{ "--reuid=daemon", "--regid=daemon", "--clear-groups", "--", psql, dsn, "-Atc", "SELECT 'in'" },
				{ "PATH=/usr/bin:/bin" }, { stdout = out, stderr = out, cwd = "/" })
			return require("projhost.proc").wait(pid, 30), h.read_file(out)
		end
		local code, text = as_daemon()
		assert.is_not.equal(0, code, "user daemon connected: " .. text)
		assert.matches("Permission denied", text, 1, true)
		assert.is_nil(text:find("\nin\n", 1, true))
		-- the same command as the owner works (so it is the mode that stops daemon)
		local rc, o, e = h.run({ "db", "psql", "-Atc", "SELECT 'in'" }, { env = env })
		assert.equal(0, rc, e)
		assert.equal("in\n", o)
	end)

	it("works the same for a user who is not root, whose cluster no other user reaches", function()
		if not is_root() then
			pending("needs root to act as two other OS users (setpriv)")
			return
		end
		-- the cluster of `daemon` (not root, so no runuser/nobody), tried by `nobody`
		local proc = require "projhost.proc"
		local base = h.tmpdir()
		assert(os.execute("chown daemon '" .. base .. "'"))
		local dhome = base .. "/d $(touch " .. mark .. ")"
		local out = base .. "/out"
		local function as(user, group, prog, args)
			local argv = { "--reuid=" .. user, "--regid=" .. group, "--clear-groups", "--", prog }
			for _, a in ipairs(args) do argv[#argv + 1] = a end
			local pid = proc.spawn("/usr/bin/setpriv", argv,
				{ "PATH=/usr/bin:/bin", "PROJHOST_HOME=" .. dhome, "PROJHOST_PG_OPTS=" .. PG_OPTS },
				{ stdout = out, stderr = out, cwd = base })
			return proc.wait(pid, 120), h.read_file(out)
		end
		local code, text = as("daemon", "daemon", h.bin, { "version" })
		if code ~= 0 then
			pending("user daemon cannot run " .. h.bin .. " here: " .. text)
			return
		end
		code, text = as("daemon", "daemon", h.bin, { "db", "start" })
		finally(function() as("daemon", "daemon", h.bin, { "db", "stop" }) end)
		assert.equal(0, code, text)
		code, text = as("daemon", "daemon", h.bin, { "db", "psql", "-Atc",
			"SELECT current_user || ' ' || current_setting('is_superuser')" })
		assert.equal(0, code, text)
		assert.equal("projhost off\n", text)
		assert.equal("rwx------", lfs.attributes(dhome .. "/run/.s.PGSQL.5432", "permissions"))
		code, text = as("nobody", "nogroup", embedded.psql_path(), { embedded.admin_dsn(dhome), "-Atc", "SELECT 'in'" })
		assert.is_not.equal(0, code, text)
		assert.matches("Permission denied", text, 1, true)
		assert.is_false(exists(mark))
	end)

	it("warns once at run start when --db connects as a superuser", function()
		local dir = h.tmpdir()
		h.write_file(dir .. "/noop.lua", [[return { from = { category = "noop" }, when = { ["*"] = function() end } }]])
		local admin = embedded.admin_dsn(home)
		local code, out, err = h.run({ "run", "--once", "--db", admin, dir }, { env = env })
		assert.equal(0, code, out .. err)
		local lines = {}
		for line in (out .. err):gmatch("[^\n]+") do
			if line:find("superuser", 1, true) then lines[#lines + 1] = line end
		end
		assert.equal(1, #lines, out .. err)
		assert.matches("WARN", lines[1], 1, true)
		assert.matches("connects as superuser projhost_admin: projection SQL can ", lines[1], 1, true)
		assert.matches("; use a role that is not a superuser", lines[1], 1, true)
		-- PROJHOST_DB is the same thing
		code, out, err = h.run({ "run", "--once", dir }, { env = { PROJHOST_HOME = home, PROJHOST_DB = admin } })
		assert.equal(0, code, out .. err)
		assert.matches("connects as superuser projhost_admin", out .. err, 1, true)
		-- the embedded role: no warning
		code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = env })
		assert.equal(0, code, out .. err)
		assert.is_nil((out .. err):find("connects as superuser", 1, true))
	end)
end)
