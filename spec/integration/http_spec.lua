-- The HTTP surface of the master (`projhost run --http ADDR`), with real
-- clients: curl, promtool (Debian prometheus), headless Chromium, and raw
-- sockets for hostile clients (slowloris, oversized headers, too many
-- connections).
local h = require "helpers"
local core = require "projhost.core"
local cjson = require "projhost.json"

-- tally: every event of category acct. picky (partitioned): parks an
-- event without an amount, fails on one with "boom" in it.
local TALLY = [[
return {
	name = "tally",
	from = { category = "acct" },
	init = function() return { n = 0 } end,
	when = { ["*"] = function(s) s.n = s.n + 1 end },
}
]]

local PICKY = [[
return {
	name = "picky",
	from = { category = "pick" },
	partition = "stream",
	when = {
		["*"] = function(s, e)
			if e.data.boom then error("<b>boom</b> & \"quotes\"") end
			if not e.data.amount then error("no amount") end
		end,
	},
	on_error = function(err, e, attempt)
		if e.data.boom then return "fail" end
		return "park"
	end,
}
]]

local sh_quote, read_all = h.sh_quote, h.read_all
local tcp, send, recv = h.tcp_connect, h.tcp_send, h.tcp_recv

-- curl: status, body, content type. extra: more curl arguments.
local function get(base, path, extra)
	local file = os.tmpname()
	local out = read_all(("curl -s -g --max-time 30 -o %s -w '%%{http_code} %%{content_type}' %s %s 2>&1")
		:format(file, extra or "", sh_quote(base .. path)))
	local body = h.read_file(file)
	os.remove(file)
	local code, ctype = out:match("^(%d+) ?(.*)$")
	return tonumber(code), body, ctype
end


describe("projhost run --http", function()
	local dsn, conn, dir, host, base, port

	local function start(env, paths, opts)
		opts = opts or {}
		opts.env = env
		host = h.spawn({ "run", "--db", dsn, "--http", "127.0.0.1:0", paths or dir }, opts)
		local addr = h.wait_until(function()
			return host:output():match("serving HTTP on http://(127%.0%.0%.1:%d+)/")
		end, 20, "the HTTP address in the log")
		base = "http://" .. addr
		port = tonumber(addr:match(":(%d+)$"))
	end

	local function append(stream, data)
		local code, _, err = h.run({ "append", stream, "Ev", data or "{}", "--db", dsn })
		assert.equal(0, code, err)
	end

	before_each(function()
		dsn = h.fresh_db("http")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		h.write_file(dir .. "/tally.lua", TALLY)
		h.write_file(dir .. "/picky.lua", PICKY)
		append("acct-1")
		append("acct-2")
		append("acct-1")
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	local function applied(name)
		return function()
			local v = h.scalar(conn, "SELECT max(last_pos) FROM projhost.checkpoints WHERE projection = $1", name)
			return v and tonumber(v) >= 3
		end
	end

	it("exits 1 naming the address when it cannot listen (not host:port, or in use)", function()
		local code, out, err = h.run({ "run", "--db", dsn, "--http", "127.0.0.1:http", dir }, { timeout = 30 })
		assert.equal(1, code)
		assert.matches("cannot serve HTTP: '127.0.0.1:http' is not host:port", out .. err, 1, true)
		start()
		code, out, err = h.run({ "run", "--db", dsn, "--http", "127.0.0.1:" .. port, dir }, { timeout = 30 })
		assert.equal(1, code)
		assert.matches("cannot serve HTTP: cannot listen on 127.0.0.1:" .. port, out .. err, 1, true)
		-- PROJHOST_HTTP is the default of --http
		code, out, err = h.run({ "run", "--db", dsn, dir }, { env = { PROJHOST_HTTP = "127.0.0.1:" .. port }, timeout = 30 })
		assert.equal(1, code)
		assert.matches("cannot listen on 127.0.0.1:" .. port, out .. err, 1, true)
	end)

	it("serves /metrics in the Prometheus text format that promtool accepts", function()
		append("pick-1", '{"amount": 1}')
		append("pick-1", '{}') -- parked
		start()
		h.wait_until(applied("tally"), 20, "tally to apply its events")
		h.wait_until(function()
			return h.scalar(conn, "SELECT count(*) FROM projhost.parked") == "1"
		end, 20, "the parked event")
		local body
		h.wait_until(function()
			local code
			code, body = get(base, "/metrics")
			return code == 200 and body:find('projhost_parked_events{projection="picky"} 1', 1, true)
		end, 20, "the parked count in /metrics")
		local code, _, ctype = get(base, "/metrics")
		assert.equal(200, code)
		assert.matches("^text/plain; version=0.0.4", ctype)
		local f = os.tmpname()
		h.write_file(f, body)
		local out = read_all("promtool check metrics < " .. f .. " 2>&1; echo exit=$?")
		os.remove(f)
		assert.matches("exit=0\n$", out)
		assert.equal("exit=0\n", out, "promtool has remarks:\n" .. out .. "\n" .. body)
		-- figures this spec controls
		assert.matches('\nprojhost_events_applied_total{projection="tally"} 3\n', body, 1, true)
		assert.matches('\nprojhost_events_behind{projection="tally"} 0\n', body, 1, true)
		assert.matches('\nprojhost_handler_errors_total{projection="picky",action="park"} 1\n', body, 1, true)
		assert.matches('\nprojhost_projection_up{projection="tally",status="running"} 1\n', body, 1, true)
		assert.matches('\nprojhost_projection_up{projection="tally",status="failed"} 0\n', body, 1, true)
		assert.matches("\nprojhost_worker_restarts_total 0\n", body, 1, true)
		assert.matches('\nprojhost_lag_seconds{projection="tally"} 0\n', body, 1, true)
		assert.matches("\nprojhost_horizon_age_seconds %d", body)
		assert.matches('\nprojhost_reloads_total{result="ok"} 0\n', body, 1, true)
		-- a histogram of batch durations: buckets, +Inf, sum and count
		local count = tonumber(body:match("\nprojhost_batch_duration_seconds_count (%d+)\n"))
		assert.truthy(count and count >= 2, body)
		assert.equal(count, tonumber(body:match('\nprojhost_batch_duration_seconds_bucket{le="%+Inf"} (%d+)\n')))
		assert.matches("\nprojhost_batch_duration_seconds_sum [%d.e+-]+\n", body)
		-- a reload counts, by result
		h.write_file(dir .. "/broken.lua", "return {")
		h.wait_until(function()
			local _, b = get(base, "/metrics")
			return b:find('projhost_reloads_total{result="error"} 1', 1, true)
		end, 20, "the failed reload in /metrics")
	end)

	it("says /health/live and /health/ready, and which check is not ready", function()
		start()
		h.wait_until(applied("tally"), 20, "tally to apply its events")
		local code, body = get(base, "/health/live")
		assert.equal(200, code)
		h.wait_until(function()
			code, body = get(base, "/health/ready")
			return code == 200
		end, 20, "ready")
		-- a projection that failed
		append("pick-9", '{"boom": true}')
		h.wait_until(function()
			code, body = get(base, "/health/ready")
			return code == 503
		end, 20, "not ready after a failure")
		assert.matches("picky", body, 1, true)
		assert.matches("failed", body, 1, true)
		assert.equal(200, (get(base, "/health/live")))
	end)

	it("is not ready while a projection is stalled (a lock held on its read model), and says so", function()
		h.write_file(dir .. "/stuck.lua", [[
return {
	name = "stuck",
	from = { category = "stk" },
	setup = "CREATE TABLE IF NOT EXISTS stuck_rows (n int)",
	when = { ["*"] = function(s, e, ctx) ctx:exec("INSERT INTO stuck_rows VALUES (1)") end },
}
]])
		start({ PROJHOST_STALL_AFTER = "2" })
		h.wait_until(function() return get(base, "/health/ready") == 200 end, 20, "ready")
		h.wait_until(function()
			return h.scalar(conn, "SELECT to_regclass('stuck_rows') IS NOT NULL") == "t"
		end, 20, "stuck set up")
		local locker = h.connect(dsn)
		assert(locker:exec("BEGIN"))
		assert(locker:exec("LOCK TABLE stuck_rows IN ACCESS EXCLUSIVE MODE"))
		append("stk-1")
		local code, body
		h.wait_until(function()
			code, body = get(base, "/health/ready")
			return code == 503
		end, 30, "not ready while stuck is stalled")
		assert.matches("stuck", body, 1, true)
		assert.matches("stalled", body, 1, true)
		local _, metrics = get(base, "/metrics")
		assert.matches('projhost_projection_up{projection="stuck",status="stalled"} 1', metrics, 1, true)
		assert.equal(200, (get(base, "/health/live")))
		assert(locker:exec("ROLLBACK"))
		locker:close()
		h.wait_until(function() return get(base, "/health/ready") == 200 end, 30, "ready once it moves again")
	end)

	it("is not ready while a file does not load, and says which", function()
		h.write_file(dir .. "/broken.lua", "return {")
		start()
		local code, body
		h.wait_until(function()
			code, body = get(base, "/health/ready")
			return code == 503 and body:find("load", 1, true)
		end, 20, "not ready with a broken file")
		assert.matches("file", body, 1, true)
	end)

	it("is not ready when the database is unreachable, and live all the same", function()
		start()
		h.wait_until(function() return get(base, "/health/ready") == 200 end, 20, "ready")
		-- every session of the database ends; new ones are refused
		conn:close()
		conn = h.connect(h.pg().dsn)
		assert(conn:exec("ALTER DATABASE http ALLOW_CONNECTIONS false"))
		assert(conn:exec([[SELECT pg_terminate_backend(pid) FROM pg_stat_activity
			WHERE datname = 'http']]))
		local code, body
		h.wait_until(function()
			code, body = get(base, "/health/ready")
			return code == 503
		end, 20, "not ready without the database")
		assert.matches("database", body, 1, true)
		assert.equal(200, (get(base, "/health/live")))
		assert(conn:exec("ALTER DATABASE http ALLOW_CONNECTIONS true"))
		h.wait_until(function() return get(base, "/health/ready") == 200 end, 30, "ready again")
	end)

	it("serves /status: projhost.status_json() unchanged, as application/json", function()
		-- with the host's own PROJHOST_STALL_AFTER
		start({ PROJHOST_STALL_AFTER = "7.5" })
		h.wait_until(applied("tally"), 20, "tally to apply its events")
		local code, body, ctype
		local want, got
		-- what moves by itself between two reads (the snapshot is up to 2 s old)
		local function still(doc)
			doc.time, doc.horizon = nil, nil -- the horizon: whatever transaction is open right now
			for _, p in ipairs(doc.projections or {}) do
				p.lag_seconds, p.rate_1m, p.applied_1m, p.eta_seconds = nil, nil, nil, nil
			end
			return doc
		end
		h.wait_until(function()
			code, body, ctype = get(base, "/status")
			want = still(cjson.decode(h.scalar(conn, "SELECT projhost.status_json(NULL, 7.5)::text")))
			got = code == 200 and still(cjson.decode(body))
			if not got then return false end
			return require("luassert.util").deepcompare(got, want, true)
		end, 20, "/status to equal status_json()")
		assert.equal(7.5, got.stall_after)
		assert.equal(200, code)
		assert.matches("^application/json", ctype)
	end)

	it("renders / as HTML that Chromium shows: projections, errors (escaped), parked, horizon", function()
		append("pick-1", '{}') -- parked
		append("pick-2", '{"boom": 1}') -- failed, with markup in its error
		start()
		h.wait_until(applied("tally"), 20, "tally to apply its events")
		h.wait_until(function()
			return h.scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE status = 'failed'") == "1"
		end, 20, "picky to fail")
		local code, html, ctype
		h.wait_until(function()
			code, html, ctype = get(base, "/")
			return code == 200 and html:find("failed", 1, true)
		end, 20, "the page to show the failure")
		assert.matches("^text/html", ctype)
		assert.matches('<meta http%-equiv="refresh" content="%d+">', html)
		assert.falsy(html:find("<b>boom", 1, true), "the error text must be escaped")
		assert.falsy(html:lower():find("<script", 1, true))
		local out = h.tmpdir()
		local flags = "--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --user-data-dir=" .. out .. "/profile"
		local dom = read_all(("timeout 120 chromium %s --dump-dom %s 2>/dev/null"):format(flags, sh_quote(base .. "/")))
		-- what a person sees: the text of the rendered document
		local text = dom:gsub("<[^>]*>", " "):gsub("&lt;", "<"):gsub("&gt;", ">"):gsub("&quot;", '"')
			:gsub("&amp;", "&"):gsub("%s+", " ")
		assert.matches("tally", text, 1, true)
		assert.matches("picky", text, 1, true)
		assert.matches('<b>boom</b> & "quotes"', text, 1, true)
		assert.matches("parked", text:lower(), 1, true)
		assert.matches("horizon", text:lower(), 1, true)
		assert.matches("lag", text:lower(), 1, true)
		read_all(("timeout 120 chromium %s --window-size=1024,768 --screenshot=%s %s 2>/dev/null")
			:format(flags, out .. "/page.png", sh_quote(base .. "/")))
		assert.equal("\137PNG", h.read_file(out .. "/page.png"):sub(1, 4))
	end)

	it("answers /wait when the batch that applies the event is done, or at the timeout", function()
		append("pick-1", '{"amount": 1}')
		start()
		h.wait_until(applied("tally"), 20, "tally to apply its events")
		-- applied already: answered at once
		local code, body, ctype = get(base, "/wait?projection=tally&stream=acct-1&version=2&timeout_ms=5000")
		assert.equal(200, code, body)
		assert.matches("^application/json", ctype)
		assert.equal("applied", cjson.decode(body).result)
		-- pending while paused: 504 at the timeout
		assert.equal(0, (h.run({ "pause", "tally", "--db", dsn })))
		append("acct-3")
		code, body = get(base, "/wait?projection=tally&stream=acct-3&version=1&timeout_ms=300")
		assert.equal(504, code, body)
		assert.equal("pending", cjson.decode(body).result)
		-- a waiter answered by the batch that applies it
		local file = os.tmpname()
		local bg = io.popen(("curl -s --max-time 60 -o %s -w '%%{http_code}' %s"):format(file,
			sh_quote(base .. "/wait?projection=tally&stream=acct-3&version=1&timeout_ms=30000")))
		core.sleep(0.5)
		assert.equal(0, (h.run({ "resume", "tally", "--db", dsn })))
		local status = bg:read("*a")
		bg:close()
		assert.equal("200", status)
		assert.equal("applied", cjson.decode(h.read_file(file)).result)
		os.remove(file)
		-- a parked event counts as handled, and the answer says so
		append("pick-1", "{}")
		h.wait_until(function()
			code, body = get(base, "/wait?projection=picky&stream=pick-1&version=2&timeout_ms=5000")
			return code == 200
		end, 20, "the parked event's wait")
		assert.equal("parked", cjson.decode(body).result)
	end)

	it("keeps a /wait longer than the connection timeout (PH_HTTP_TIMEOUT_S) until its own timeout", function()
		start()
		h.wait_until(applied("tally"), 20, "tally to apply its events")
		assert.equal(0, (h.run({ "pause", "tally", "--db", dsn })))
		append("acct-3")
		local code, body = get(base, "/wait?projection=tally&stream=acct-3&version=1&timeout_ms=12000")
		assert.equal(504, code, body)
		assert.equal("pending", cjson.decode(body).result)
	end)

	it("answers /health/live while the database hangs, and /health/ready says why it is not ready", function()
		start()
		h.wait_until(function() return get(base, "/health/ready") == 200 end, 20, "ready")
		local locker = h.connect(dsn)
		assert(locker:exec("BEGIN"))
		assert(locker:exec("LOCK TABLE projhost.checkpoints IN ACCESS EXCLUSIVE MODE"))
		core.sleep(2.2) -- the snapshot is stale: the next request reads it again
		local file = os.tmpname()
		local bg = io.popen(("curl -s --max-time 60 -o %s -w '%%{http_code}' %s"):format(file,
			sh_quote(base .. "/health/ready")))
		core.sleep(0.5)
		assert.equal(200, (get(base, "/health/live")))
		local status = bg:read("*a")
		bg:close()
		assert(locker:exec("ROLLBACK"))
		locker:close()
		assert.equal("503", status)
		assert.matches("statement timeout", h.read_file(file), 1, true)
		os.remove(file)
		h.wait_until(function() return get(base, "/health/ready") == 200 end, 20, "ready again")
	end)

	it("sees a batch another instance committed at the fallback poll at the latest", function()
		append("pick-5", '{"amount": 1}')
		start({ PROJHOST_POLL_INTERVAL = "1" })
		h.wait_until(function()
			return h.scalar(conn, "SELECT last_pos FROM projhost.checkpoints WHERE partition = 'pick-5'") == "1"
		end, 20, "picky to apply pick-5@1")
		-- paused, this host runs no batch of picky (its polls only look for partitions)
		assert.equal(0, (h.run({ "pause", "picky", "--db", dsn })))
		append("pick-5", '{"amount": 2}')
		local file = os.tmpname()
		local bg = io.popen(("curl -s --max-time 15 -o %s -w '%%{http_code}' %s"):format(file,
			sh_quote(base .. "/wait?projection=picky&stream=pick-5&version=2&timeout_ms=60000")))
		core.sleep(0.5)
		-- what another instance's batch leaves: the partition's checkpoint past the event
		assert(conn:exec("UPDATE projhost.checkpoints SET last_pos = 2 WHERE projection = 'picky' AND partition = 'pick-5'"))
		local status = bg:read("*a")
		bg:close()
		assert.equal("200", status)
		assert.equal("applied", cjson.decode(h.read_file(file)).result)
		os.remove(file)
	end)

	it("refuses bad /wait parameters (400) and an unknown projection (404)", function()
		start()
		h.wait_until(applied("tally"), 20, "tally to apply its events")
		for _, q in ipairs({
			"", "?projection=tally", "?projection=tally&stream=acct-1",
			"?projection=tally&stream=acct-1&version=abc", "?projection=tally&stream=acct-1&version=0",
			"?projection=tally&stream=acct-1&version=1&timeout_ms=-5",
			"?projection=tally&stream=acct-1&version=1&timeout_ms=1e3",
			"?projection=tally&stream=acct-1&version=99999999999999999999999",
			"?projection=&stream=acct-1&version=1",
			"?projection=tally&stream=acct-1%00x&version=1", -- a NUL cannot be part of a stream name
			"?projection=tally&stream=acct-1&version=1%00",
		}) do
			local code, body = get(base, "/wait" .. q)
			assert.equal(400, code, q .. ": " .. body)
			assert.truthy(cjson.decode(body).error, body)
		end
		local code, body = get(base, "/wait?projection=nope&stream=acct-1&version=1&timeout_ms=100")
		assert.equal(404, code, body)
		assert.matches("nope", cjson.decode(body).error, 1, true)
		code = get(base, "/no/such/page")
		assert.equal(404, code)
		code = get(base, "/metrics", "-X POST -d x=1")
		assert.equal(405, code)
	end)

	it("holds at most PH_WAIT_MAX_WAITERS /wait requests, so /health still answers", function()
		local had = h.open_files(4096)
		start()
		h.wait_until(applied("tally"), 20, "tally to apply its events")
		assert.equal(0, (h.run({ "pause", "tally", "--db", dsn })))
		append("acct-3")
		local socks = {}
		local req = "GET /wait?projection=tally&stream=acct-3&version=1&timeout_ms=60000 HTTP/1.1\r\nHost: x\r\n\r\n"
		for i = 1, 300 do
			socks[i] = tcp(port)
			send(socks[i], req)
		end
		-- the ones past the cap are answered 503 at once; the others wait
		local refused, waiting = 0, 0
		core.sleep(1)
		for i = 1, 300 do
			local got = recv(socks[i], 0) -- the refusals came during the second
			if got and got:match("^HTTP/1%.1 503") then refused = refused + 1
			elseif got == nil then waiting = waiting + 1 end
		end
		assert.equal(256, waiting)
		assert.equal(44, refused)
		assert.equal(200, (get(base, "/health/live")))
		-- and all of them are answered by the batch that applies the event
		assert.equal(0, (h.run({ "resume", "tally", "--db", dsn })))
		local answered = 0
		for i = 1, 300 do
			local got = recv(socks[i], 20)
			if got and got:match("^HTTP/1%.1 200") and got:find('"result":"applied"', 1, true) then
				answered = answered + 1
			end
			h.tcp_close(socks[i])
		end
		assert.equal(256, answered)
		h.open_files(had)
	end)

	it("stops cleanly on SIGINT, answering a /wait still pending with 503", function()
		start()
		h.wait_until(applied("tally"), 20, "tally to apply its events")
		assert.equal(0, (h.run({ "pause", "tally", "--db", dsn })))
		append("acct-3")
		local fd = tcp(port)
		send(fd, "GET /wait?projection=tally&stream=acct-3&version=1&timeout_ms=60000 HTTP/1.1\r\nHost: x\r\n\r\n")
		assert.is_nil(recv(fd, 0.5))
		host:kill(2)
		local got = recv(fd, 20)
		h.tcp_close(fd)
		assert.matches("^HTTP/1%.1 503", got)
		assert.matches("shutting down", got, 1, true)
		assert.equal(0, host:wait(20))
	end)

	it("answers while a slowloris client holds a connection open, then closes that connection", function()
		start()
		local fd = tcp(port)
		assert.equal(#"GET /metrics HTTP/1.1\r\nHost: x\r\n", send(fd, "GET /metrics HTTP/1.1\r\nHost: x\r\n"))
		-- the loop is not blocked by the half-sent request
		assert.equal(200, (get(base, "/health/live")))
		assert.is_nil(recv(fd, 0.2))
		-- a client that never finishes is timed out (PH_HTTP_TIMEOUT_S)
		local got = recv(fd, 40)
		assert.is_not_nil(got, "the server did not close the slow connection")
		h.tcp_close(fd)
		assert.equal(200, (get(base, "/health/live")))
	end)

	it("refuses an oversized request and still answers the next one", function()
		start()
		local code = get(base, "/health/live", "-H " .. sh_quote("X-Big: " .. ("a"):rep(100000)))
		assert.truthy(code == 431 or code == 413 or code == 0 or code == 400, tostring(code))
		local fd = tcp(port)
		send(fd, "GET /" .. ("x"):rep(200000) .. " HTTP/1.1\r\nHost: x\r\n\r\n")
		local got = recv(fd, 20)
		h.tcp_close(fd)
		assert.truthy(got == "" or (got and got:match("^HTTP/1%.1 4%d%d")), got)
		assert.equal(200, (get(base, "/health/live")))
	end)

	it("holds at most its connection limit (PH_HTTP_CONNECTIONS, fewer under a low open-files limit) and serves again when they go", function()
		local had = h.open_files(4096) -- our side of the flood
		local function flood(n, most)
			local function fds()
				return tonumber(read_all("ls /proc/" .. host.pid .. "/fd | wc -l"))
			end
			local before = fds()
			local socks = {}
			for i = 1, n do
				socks[i] = tcp(port)
				send(socks[i], "GET /health/live HTTP/1.1\r\nHost: x\r\n") -- never finished
			end
			core.sleep(0.5)
			-- the kernel queues the rest; the master holds no more than its limit
			local held = fds() - before
			-- (a few more for the master's own descriptors coming and going)
			assert.truthy(held >= most / 2 and held <= most + 4, "descriptors held: " .. held)
			for i = 1, n do h.tcp_close(socks[i]) end
			h.wait_until(function() return get(base, "/health/live") == 200 end, 20, "an answer after the flood")
			h.wait_until(function() return fds() <= before + 1 end, 20, "the flood's connections to be closed")
		end
		start()
		flood(1500, 1408)
		h.stop_all()
		-- a hard limit of 512 descriptors: 256 connections, said at the start
		start(nil, nil, { prefix = { "/usr/bin/prlimit", "--nofile=512:512" } })
		assert.matches("the open files limit is 512: serving at most 256 HTTP connections", host:output())
		flood(400, 256)
		-- and its subscribers' share of them (1,024 of 1,408): /metrics stays
		local subs, refused_at = {}, nil
		for i = 1, 300 do
			local fd = tcp(port)
			send(fd, "GET /subscribe?all=1 HTTP/1.0\r\n\r\n")
			local got = h.tcp_recv(fd, 10) or ""
			subs[i] = fd
			if not got:find("^HTTP/1%.%d 200") then
				assert.matches("^HTTP/1%.%d 503", got)
				refused_at = i
				break
			end
		end
		assert.equal(math.floor(1024 * 256 / 1408) + 1, refused_at)
		assert.equal(200, (get(base, "/metrics")))
		for _, fd in ipairs(subs) do h.tcp_close(fd) end
		h.open_files(had)
	end)
end)
