-- What projection code writes into an event never reaches the host. A
-- handler or an on_error callback may assign any field of its `e`
-- (position, version, stream, tx, partition, index) or rawset the
-- fields the lazy loader uses; the host's checkpoint, its next read, its
-- failure plan and the dead letter must still be the event's own. (Before:
-- `e.position = e.position + 1000` moved an unpartitioned checkpoint 1,000
-- events ahead, and they were never applied.)
local h = require "helpers"
local scalar = h.scalar

local TAMPER = [[
	local function tamper(e)
		rawset(e, "position", (rawget(e, "position") or 0) + 1000)
		e.version = -5
		e.stream = "elsewhere"
		e.tx = "999999999"
		e.partition = "zz"
		e.index = 1
		rawset(e, "_row", 0)
		rawset(e, "_page", nil)
	end
]]

local function projection(name, partitioned, extra)
	return ([[
%s
return {
	name = "%s",
	from = { category = "tp" },
	%s
	setup = "CREATE TABLE IF NOT EXISTS %s_seen (position bigint PRIMARY KEY, stream text, version bigint, id text)",
	init = function() return { n = 0 } end,
	when = {
		["*"] = function(s, e, ctx)
			if e.type == "Boom" then tamper(e); error("boom") end
			ctx:exec("INSERT INTO %s_seen VALUES ($1, $2, $3, $4)", e.position, e.stream, e.version, e.id)
			tamper(e)
			s.n = s.n + 1
		end,
	},
	%s
}
]]):format(TAMPER, name, partitioned and 'partition = "stream",' or "", name, name, extra or "")
end

describe("projection code cannot rewrite the host's events", function()
	local dsn, conn, dir

	before_each(function()
		dsn = h.fresh_db("tamper")
		conn = h.connect(dsn)
		assert(require("projhost.schema").migrate(conn))
		dir = h.tmpdir()
	end)

	after_each(function()
		h.stop_all()
		if conn then conn:close() end
	end)

	local function append(stream, etype, n)
		for _ = 1, n or 1 do
			assert(conn:query("SELECT projhost.append($1, NULL, $2::jsonb)", stream,
				'[{"type":"' .. (etype or "A") .. '"}]'))
		end
	end

	local function run_once(env)
		local code, out, err = h.run({ "run", "--once", "--db", dsn, dir }, { env = env, timeout = 60 })
		assert.equal(0, code, out .. err)
		return err
	end

	for _, partitioned in ipairs({ false, true }) do
		local kind = partitioned and "partitioned" or "unpartitioned"
		it("a handler that assigns every field of its event: every event applied once (" .. kind .. ")", function()
			h.write_file(dir .. "/p.lua", projection("p", partitioned))
			for i = 1, 6 do append("tp-" .. (i % 3), "A", 5) end
			run_once({ PROJHOST_BATCH_SIZE = 4 })
			assert.equal("30", scalar(conn, "SELECT count(*) FROM p_seen"))
			-- what the handler saw is each event's own
			assert.equal("0", scalar(conn, [[SELECT count(*) FROM p_seen s JOIN projhost.events e
				ON e.global_position = s.position
				WHERE e.stream_id <> s.stream OR e.stream_version <> s.version OR e.event_id::text <> s.id]]))
			-- and live, after the catch-up: the next events are not skipped
			local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = "4" } })
			append("tp-1", "A", 7)
			append("tp-9", "A", 2)
			local ok, err = pcall(h.wait_until, function()
				return scalar(conn, "SELECT count(*) FROM p_seen") == "39"
			end, 30, "the live events applied")
			if not ok then error(err .. "\n" .. host:output()) end
			host:kill(15)
			assert.equal(0, host:wait(30), host:output())
			assert.equal("39", scalar(conn, "SELECT count(*) FROM p_seen"))
			if not partitioned then
				assert.equal(scalar(conn, "SELECT max(global_position) FROM projhost.events"),
					scalar(conn, "SELECT last_pos FROM projhost.checkpoints WHERE projection = 'p'"))
			else
				assert.equal("0", scalar(conn, [[SELECT count(*) FROM projhost.streams s
					LEFT JOIN projhost.checkpoints c ON c.projection = 'p' AND c.partition = s.stream_id
					WHERE c.last_pos IS DISTINCT FROM s.version]]))
			end
		end)

		it("a failing handler and an on_error that assign its fields: the real event is parked (" .. kind .. ")", function()
			h.write_file(dir .. "/p.lua", projection("p", partitioned,
				'on_error = function(_, e) tamper(e); return "park" end,'))
			append("tp-1", "A", 3)
			append("tp-1", "Boom")
			append("tp-1", "A", 2)
			append("tp-2", "A", 2)
			local log = run_once()
			assert.equal("7", scalar(conn, "SELECT count(*) FROM p_seen"), log)
			local boom = assert(conn:query([[SELECT global_position, stream_id, stream_version, event_id::text AS id
				FROM projhost.events WHERE event_type = 'Boom']]))[1]
			local parked = assert(conn:query([[SELECT global_position, stream_id, stream_version, event_id::text AS id
				FROM projhost.parked WHERE projection = 'p']]))
			assert.equal(1, #parked)
			assert.same(boom, parked[1])
		end)
	end
end)
