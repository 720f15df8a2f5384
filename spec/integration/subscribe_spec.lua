-- GET /subscribe on the master's HTTP server: live subscriptions as
-- Server-Sent Events, checked with real clients (curl -N) and raw sockets
-- (a client that stops reading).
local h = require "helpers"
local core = require "projhost.core"
local cjson = require "projhost.json"

local sh_quote, read_all = h.sh_quote, h.read_all
local tcp, send, recv = h.tcp_connect, h.tcp_send, h.tcp_recv

-- SSE text into events: { id =, event =, data = (decoded JSON or raw) },
-- and comments as { comment = text }.
local function parse(text)
	local out = {}
	for block in text:gmatch("(.-)\n\n") do
		local ev = {}
		for line in (block .. "\n"):gmatch("(.-)\n") do
			local c = line:match("^:%s?(.*)$")
			if c then
				out[#out + 1] = { comment = c }
			else
				local k, v = line:match("^([^:]+): ?(.*)$")
				if k then ev[k] = v end
			end
		end
		if next(ev) then
			if ev.data then ev.data = cjson.decode(ev.data) end
			out[#out + 1] = ev
		end
	end
	return out
end

local function events_of(list)
	local out = {}
	for _, e in ipairs(list) do
		if e.id then out[#out + 1] = e end
	end
	return out
end

-- curl -N in the background, writing to a file.
local Curl = {}
Curl.__index = Curl

local function curl(url, extra)
	local c = setmetatable({ file = os.tmpname() }, Curl)
	c.pid = read_all(("curl -N -s -g --max-time 120 %s %s > %s 2>/dev/null & echo $!")
		:format(extra or "", sh_quote(url), c.file)):match("%d+")
	return c
end

function Curl:text() return h.read_file(self.file) or "" end
function Curl:parsed() return parse(self:text()) end
function Curl:events() return events_of(self:parsed()) end
function Curl:stop()
	os.execute("kill " .. self.pid .. " 2>/dev/null")
	os.remove(self.file)
end

-- Everything until EOF (or timeout seconds without a byte).
local function recv_all(fd, timeout)
	local parts = {}
	while true do
		local s = recv(fd, timeout)
		if not s or s == "" then return table.concat(parts), s == "" end
		parts[#parts + 1] = s
	end
end

describe("GET /subscribe", function()
	local dsn, conn, dir, host, base, port
	local clients = {}

	local function start(addr)
		host = h.spawn({ "run", "--db", dsn, "--http", addr or "127.0.0.1:0", dir })
		local addr = h.wait_until(function()
			return host:output():match("serving HTTP on http://(127%.0%.0%.1:%d+)/")
		end, 20, "the HTTP address in the log")
		base = "http://" .. addr
		port = tonumber(addr:match(":(%d+)$"))
	end

	local function append(stream, etype, data, c)
		assert((c or conn):query("SELECT projhost.append($1, NULL, $2::jsonb)", stream,
			cjson.encode({ { type = etype or "Ev", data = data or {} } })))
	end

	local function subscribe(query, extra)
		local c = curl(base .. "/subscribe?" .. query, extra)
		clients[#clients + 1] = c
		-- attached: from here on nothing appended is missed
		h.wait_until(function() return c:text():find(": subscribed\n", 1, true) end, 20, "the subscribed comment")
		return c
	end

	local function wait_events(c, n)
		return h.wait_until(function()
			local ev = c:events()
			return #ev >= n and ev
		end, 30, n .. " events")
	end

	before_each(function()
		dsn = h.fresh_db("subscribe")
		conn = h.connect(dsn)
		dir = h.tmpdir()
		h.write_file(dir .. "/noop.lua", [[return { name = "noop", from = { all = true }, when = { ["*"] = function() end } }]])
	end)

	after_each(function()
		for _, c in ipairs(clients) do c:stop() end
		clients = {}
		h.stop_all()
		if conn then conn:close() end
	end)

	it("streams a category's events to curl -N in order, as text/event-stream, live only without a token", function()
		start()
		h.wait_until(function() return h.scalar(conn, "SELECT to_regclass('projhost.events')") end, 20, "the schema")
		append("acct-0", "Old")
		local hdr = os.tmpname()
		local c = subscribe("category=acct", "-D " .. hdr)
		assert.matches("content%-type: text/event%-stream", h.read_file(hdr):lower())
		os.remove(hdr)
		append("acct-1", "Opened", { n = 1 })
		append("other-1", "Opened", { n = 99 })
		append("acct-2", "Opened", { n = 2 })
		append("acct-1", "Deposited", { n = 3 })
		local ev = wait_events(c, 3)
		assert.equal(3, #ev)
		local pos = {}
		for i, e in ipairs(ev) do
			assert.equal(i, e.data.data.n)
			assert.equal(e.event, e.data.type)
			assert.matches("^%d+%.%d+$", e.id)
			pos[i] = e.data.position
			assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d", e.data.time)
		end
		assert.same({ "acct-1", "acct-2", "acct-1" }, { ev[1].data.stream, ev[2].data.stream, ev[3].data.stream })
		assert.same({ 1, 1, 2 }, { ev[1].data.version, ev[2].data.version, ev[3].data.version })
		assert.truthy(pos[1] < pos[2] and pos[2] < pos[3])
		-- live only: no marker, nothing from before it came
		for _, e in ipairs(c:parsed()) do assert.is_not.equal("caught_up", e.event) end
	end)

	it("resumes after Last-Event-ID (or from=): exactly the rest, once, one caught_up marker, then live", function()
		start()
		h.wait_until(function() return h.scalar(conn, "SELECT to_regclass('projhost.events')") end, 20, "the schema")
		for i = 1, 5 do append("acct-" .. i, "Ev", { n = i }) end
		local all = subscribe("category=acct&from=0.0")
		local ev = wait_events(all, 5)
		local third = ev[3].id
		local c = subscribe("category=acct", "-H " .. sh_quote("Last-Event-ID: " .. third))
		local c2 = subscribe("category=acct&from=" .. third)
		append("acct-9", "Ev", { n = 6 })
		for _, cl in ipairs({ c, c2 }) do
			wait_events(cl, 3)
			local list = cl:parsed()
			local seen, markers = {}, 0
			for _, e in ipairs(list) do
				if e.event == "caught_up" then
					markers = markers + 1
					assert.equal(2, #seen) -- 4 and 5 before it, 6 after
				elseif e.id then
					seen[#seen + 1] = e.data.data.n
				end
			end
			assert.equal(1, markers)
			assert.same({ 4, 5, 6 }, seen)
		end
		-- a bad token is refused
		local code = read_all(("curl -s -o /dev/null -w '%%{http_code}' --max-time 10 %s")
			:format(sh_quote(base .. "/subscribe?all=1&from=12x")))
		assert.equal("400", code)
	end)

	it("delivers a late-committing transaction's events in order, never skipping them", function()
		start()
		local c = subscribe("all=1")
		local late = h.connect(dsn)
		assert(late:exec("BEGIN"))
		append("acct-late", "Late", { n = 1 }, late) -- position 1, not committed
		append("acct-x", "Early", { n = 2 }) -- position 2, committed first
		append("acct-y", "Early", { n = 3 })
		-- the committed ones wait behind the open transaction
		core.sleep(1)
		assert.equal(0, #c:events())
		assert(late:exec("COMMIT"))
		late:close()
		local ev = wait_events(c, 3)
		assert.same({ "Late", "Early", "Early" }, { ev[1].event, ev[2].event, ev[3].event })
		assert.equal(1, ev[1].data.position)
		-- and a resume from before the late one gets the same order
		local r = subscribe("all=1&from=0.0")
		local ev2 = wait_events(r, 3)
		for i = 1, 3 do assert.equal(ev[i].id, ev2[i].id) end
	end)

	it("filters by stream, category, all and types", function()
		start()
		local s = subscribe("stream=acct-1")
		local t = subscribe("category=acct&types=B,C")
		local a = subscribe("all=1&types=A")
		append("acct-1", "A", { n = 1 })
		append("acct-10", "B", { n = 2 })
		append("acct-1", "C", { n = 3 })
		append("zz-1", "A", { n = 4 })
		append("acct", "B", { n = 5 }) -- category acct too: no '-'
		local se = wait_events(s, 2)
		local te = wait_events(t, 3)
		local ae = wait_events(a, 2)
		local function ns(ev)
			local out = {}
			for i, e in ipairs(ev) do out[i] = e.data.data.n end
			return out
		end
		assert.same({ 1, 3 }, ns(se))
		assert.same({ 2, 3, 5 }, ns(te))
		assert.same({ 1, 4 }, ns(ae))
		-- the same filters from the store
		local r = subscribe("category=acct&types=B,C&from=0.0")
		h.wait_until(function() return r:text():find("event: caught_up", 1, true) end, 20, "caught_up")
		assert.same({ 2, 3, 5 }, ns(r:events()))
		-- bad requests
		for _, q in ipairs({ "", "category=a&stream=b", "all=2", "category=", "all=1&types=" }) do
			local code = read_all(("curl -s -o /dev/null -w '%%{http_code}' --max-time 10 %s")
				:format(sh_quote(base .. "/subscribe?" .. q)))
			assert.equal("400", code, q)
		end
	end)

	it("disconnects a client that stops reading with a final overflow event naming its last token", function()
		start()
		local fd = tcp(port, 4096)
		send(fd, "GET /subscribe?all=1 HTTP/1.0\r\nHost: x\r\n\r\n")
		local head = ""
		h.wait_until(function()
			local s = recv(fd, 10)
			if not s or s == "" then error("no subscribed comment") end
			head = head .. s
			return head:find(": subscribed\n", 1, true)
		end, 20, "the subscribed comment")
		-- far more than the subscriber's buffer and the sockets' buffers
		local big = string.rep("x", 2000)
		assert(conn:exec(([[INSERT INTO projhost.events (stream_id, stream_version, event_type, data)
			SELECT 'big-' || i, 1, 'Big', jsonb_build_object('pad', '%s', 'n', i)
			FROM generate_series(1, 8000) i]]):format(big)))
		assert(conn:exec("NOTIFY projhost, '0 *'"))
		h.wait_until(function()
			local body = read_all(("curl -s --max-time 10 %s"):format(sh_quote(base .. "/metrics")))
			return body:find("\nprojhost_subscriber_overflows_total 1\n", 1, true)
		end, 60, "an overflow in /metrics")
		local rest, eof = recv_all(fd, 20)
		h.tcp_close(fd)
		assert.is_true(eof)
		local text = (head .. rest):gsub("^.-\r\n\r\n", "")
		local list = parse(text)
		local last = list[#list]
		assert.equal("overflow", last.event)
		local ev = events_of(list)
		assert.truthy(#ev > 0 and #ev < 8000)
		assert.equal(ev[#ev].id, last.data.last)
		for i, e in ipairs(ev) do assert.equal(i, e.data.data.n) end
		-- resuming from that token gets the rest, in order, once
		local r = subscribe("all=1&from=" .. last.data.last)
		h.wait_until(function() return r:text():find("event: caught_up", 1, true) end, 60, "caught_up")
		local rev = r:events()
		assert.equal(8000 - #ev, #rev)
		assert.equal(#ev + 1, rev[1].data.data.n)
		assert.equal(8000, rev[#rev].data.data.n)
	end)

	it("serves a thousand idle subscribers from one shared read per batch, 503 beyond 1,024, a slot freed when one leaves", function()
		-- the host starts under a fresh Debian session's soft limit of open
		-- files (1,024): it must raise its own to hold them all
		local had = h.open_files(1024)
		start()
		h.open_files(4096) -- our side of the connections
		local subs, limit = {}, nil
		for i = 1, 1100 do
			local fd = tcp(port)
			send(fd, "GET /subscribe?all=1 HTTP/1.0\r\n\r\n")
			local s = recv(fd, 10) or ""
			if s:find("^HTTP/1%.%d 503") then
				limit = i - 1
				h.tcp_close(fd)
				break
			end
			assert.matches("^HTTP/1%.%d 200", s)
			subs[i] = { fd = fd, text = s }
		end
		assert.equal(1024, limit)
		assert.falsy(host:output():find("open files limit", 1, true))
		local function reads()
			local m = read_all(("curl -s --max-time 10 %s"):format(sh_quote(base .. "/metrics")))
			return tonumber(m:match("\nprojhost_subscriber_reads_total (%d+)"))
		end
		-- every one attached (live from its ": subscribed" on)
		for _, u in ipairs(subs) do
			h.wait_until(function()
				u.text = u.text .. (recv(u.fd, 0) or "")
				return u.text:find(": subscribed\n", 1, true)
			end, 20, "the subscribed comment")
		end
		local r0 = reads()
		for i = 1, 10 do append("fan-" .. i % 3, "Ev", { n = i }) end
		for _, u in ipairs(subs) do
			local ev = h.wait_until(function()
				u.text = u.text .. (recv(u.fd, 0.05) or "")
				local ev = events_of(parse(u.text:gsub("^.-\r\n\r\n", "")))
				return #ev >= 10 and ev
			end, 30, "ten events at every subscriber")
			assert.equal(10, #ev)
			for i, e in ipairs(ev) do assert.equal(i, e.data.data.n) end
		end
		-- ten appends, a few wake-ups each at most: the reads do not grow
		-- with the number of subscribers (one each would be 10,240)
		local dr = reads() - r0
		assert.truthy(dr >= 1 and dr <= 40, "shared reads for 10 appends: " .. dr)
		-- the rest of the surface still answers
		assert.equal("200", read_all(("curl -s -o /dev/null -w '%%{http_code}' --max-time 10 %s")
			:format(sh_quote(base .. "/health/live"))))
		h.tcp_close(table.remove(subs).fd)
		h.wait_until(function()
			local fd = tcp(port)
			send(fd, "GET /subscribe?all=1 HTTP/1.0\r\n\r\n")
			local s = recv(fd, 10) or ""
			if s:find("^HTTP/1%.%d 200") then subs[#subs + 1] = { fd = fd } return true end
			h.tcp_close(fd)
		end, 45, "a free subscriber slot (noticed at a heartbeat)")
		for _, u in ipairs(subs) do h.tcp_close(u.fd) end
		h.open_files(had)
	end)

	it("a browser's EventSource (headless Chromium) reconnects after the host is killed and ends with every event once, in order", function()
		if os.execute("command -v chromium >/dev/null 2>&1") ~= 0 and os.execute("command -v chromium >/dev/null 2>&1") ~= true then
			pending("chromium is not installed")
			return
		end
		start()
		-- headless Chromium dumps the DOM at the load event: an image from a
		-- second host's /wait, pending until its projection applies (once a
		-- row is in stuck_go), holds it back while the first host is killed
		local hold = h.tmpdir()
		h.write_file(hold .. "/stuck.lua", [[return { name = "stuck", from = { category = "stuck" },
			setup = { "CREATE TABLE IF NOT EXISTS stuck_go (x int)" },
			when = { ["*"] = function(s, e, ctx)
				if ctx:query("SELECT count(*) AS n FROM stuck_go")[1].n == "0" then error("not yet") end
			end },
			on_error = function() return "retry", 0.2 end }]])
		local other = h.spawn({ "run", "--db", dsn, "--http", "127.0.0.1:0", hold })
		local oaddr = h.wait_until(function()
			return other:output():match("serving HTTP on http://(127%.0%.0%.1:%d+)/")
		end, 20, "the second host's address")
		append("stuck-1", "Ev")
		local addr = base:match("//(.*)$")
		local page = h.tmpdir() .. "/sse.html"
		-- the page is a file: its EventSource is cross-origin, which only
		-- --disable-web-security allows (the host sends no CORS headers)
		h.write_file(page, ([[<!DOCTYPE html><html><body><pre id="out"></pre><script>
			const out = document.getElementById("out"), seen = [];
			const es = new EventSource("%s/subscribe?category=web&from=0.0");
			es.addEventListener("Ev", (e) => {
				seen.push(e.lastEventId + " " + JSON.parse(e.data).data.n);
				out.textContent = seen.join("\n");
			});
			es.addEventListener("caught_up", () => { out.dataset.caught = (+(out.dataset.caught || 0) + 1); });
		</script><img src="http://%s/wait?projection=stuck&stream=stuck-1&version=1&timeout_ms=90000"></body></html>]])
			:format(base, oaddr))
		local dom = os.tmpname()
		local profile = h.tmpdir()
		local pid = read_all(("timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-web-security"
			.. " --user-data-dir=%s --dump-dom %s > %s 2>/dev/null & echo $!")
			:format(profile, sh_quote("file://" .. page), dom)):match("%d+")
		for i = 1, 5 do append("web-1", "Ev", { n = i }) end
		h.wait_until(function()
			local body = read_all(("curl -s --max-time 10 %s"):format(sh_quote(base .. "/metrics")))
			return body:find("\nprojhost_subscriber_events_total [5-9]") or body:find("\nprojhost_subscriber_events_total %d%d")
		end, 60, "the browser to receive the first events")
		-- the server drops it: SIGKILL, appends meanwhile, a new host on the same port
		host:kill(9)
		host:wait(10)
		for i = 6, 8 do append("web-2", "Ev", { n = i }) end
		start(addr)
		for i = 9, 10 do append("web-1", "Ev", { n = i }) end
		-- the browser reconnected and got the rest (6 to 10) from the new host
		h.wait_until(function()
			local body = read_all(("curl -s --max-time 10 %s"):format(sh_quote(base .. "/metrics")))
			return body:find("\nprojhost_subscriber_events_total [5-9]") or body:find("\nprojhost_subscriber_events_total %d%d")
		end, 60, "the browser to receive the rest")
		assert(conn:exec("INSERT INTO stuck_go VALUES (1)"))
		h.wait_until(function() return os.execute("kill -0 " .. pid .. " 2>/dev/null") ~= 0
			and os.execute("kill -0 " .. pid .. " 2>/dev/null") ~= true end, 90, "chromium to finish")
		local text = h.read_file(dom) or ""
		os.remove(dom)
		local lines = text:match('<pre id="out"[^>]*>(.-)</pre>') or ""
		local ns, ids = {}, {}
		for id, n in lines:gmatch("(%S+) (%d+)") do
			ns[#ns + 1] = tonumber(n)
			ids[#ids + 1] = id
		end
		assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, ns, text)
		-- each with its own resume token (TX.POS), in the store's order
		for i = 2, #ids do
			local t1, p1 = ids[i - 1]:match("^(%d+)%.(%d+)$")
			local t2, p2 = ids[i]:match("^(%d+)%.(%d+)$")
			assert.is_true(tonumber(t2) > tonumber(t1) or (t2 == t1 and tonumber(p2) > tonumber(p1)), text)
		end
		-- one marker per connection: the first and the reconnection
		assert.matches('data%-caught="2"', text)
	end)
end)
