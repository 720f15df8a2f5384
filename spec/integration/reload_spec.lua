-- Hot reload: edit a projection file while the host runs; the new code is
-- live between batches, with no event lost or applied twice.
local h = require "helpers"
local scalar = h.scalar
local core = require "projhost.core"

-- Unpartitioned; each event's effect is a row tagged with the code version
-- that applied it (position is the key: applying twice fails loudly).
local function tagged(tag, extra)
	return ([[
return {
	name = "tagged",
	from = { category = "rl" },
	setup = "CREATE TABLE IF NOT EXISTS tagged (position bigint PRIMARY KEY, tag text NOT NULL)",
	init = function() return { n = 0 } end,
	when = {
		["*"] = function(s, e, ctx)
			s.n = s.n + 1
			ctx:exec("INSERT INTO tagged VALUES ($1, $2)", e.position, "%s")
		end,
	},
	%s
}
]]):format(tag, extra or "")
end

describe("hot reload", function()
	local dsn, conn, dir, writer

	local function append_many(n, stream)
		for _ = 1, n do
			assert(conn:query("SELECT projhost.append($1, NULL, '[{\"type\":\"Inc\"}]')", stream or "rl-1"))
		end
	end

	local function applied()
		local rows = conn:query("SELECT count(*) AS n FROM tagged")
		return rows and tonumber(rows[1].n) or 0
	end

	local function total()
		return tonumber(scalar(conn, "SELECT count(*) FROM projhost.events WHERE stream_id LIKE 'rl-%'"))
	end

	before_each(function()
		dsn = h.fresh_db("reload")
		conn = h.connect(dsn)
		assert(require("projhost.schema").migrate(conn))
		dir = h.tmpdir()
	end)

	after_each(function()
		h.stop_all()
		if writer then writer:close() end
		writer = nil
		if conn then conn:close() end
	end)

	it("applies each event once, with the code current when its batch ran, across saves", function()
		h.write_file(dir .. "/tagged.lua", tagged("v1"))
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 10 } })
		h.wait_until(function() return host:output():find("serving 1", 1, true) end, 20, "start-up")
		-- a steady stream of appends from a second connection
		writer = h.connect(dsn)
		for tag = 2, 5 do
			for _ = 1, 30 do
				assert(writer:query("SELECT projhost.append('rl-1', NULL, '[{\"type\":\"Inc\"}]')"))
				core.sleep(0.005)
			end
			-- editors write a temporary file and rename it over the original
			h.write_file(dir .. "/.tagged.lua.tmp", tagged("v" .. tag))
			assert(os.rename(dir .. "/.tagged.lua.tmp", dir .. "/tagged.lua"))
			h.wait_until(function()
				return host:output():find("tagged reloaded (hash ", 1, true)
					and select(2, host:output():gsub("tagged reloaded", "")) >= tag - 1
			end, 10, "reload " .. tag)
		end
		append_many(20)
		h.wait_until(function() return applied() == total() end, 20, "every event applied")
		-- each position once (primary key), tags never go back in read order
		local rows = assert(conn:query([[SELECT t.tag FROM tagged t
			JOIN projhost.events e ON e.global_position = t.position
			ORDER BY e.transaction_id, e.global_position]]))
		assert.equal(total(), #rows)
		local last = 1
		for _, r in ipairs(rows) do
			local v = tonumber(r.tag:match("%d+"))
			assert.is_true(v >= last, "a later event was applied by older code")
			last = v
		end
		assert.equal(5, last)
		assert.equal(tostring(total()), scalar(conn,
			"SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'tagged'"))
		-- the checkpoint records which code produced it
		local def = require("projhost.loader").load_file(dir .. "/tagged.lua")
		assert.equal(def.hash, scalar(conn, "SELECT script_hash FROM projhost.checkpoints WHERE projection = 'tagged'"))
	end)

	it("keeps the old code running when a save is broken, and reloads once it is fixed", function()
		h.write_file(dir .. "/tagged.lua", tagged("good"))
		local host = h.spawn({ "run", "--db", dsn, dir })
		h.wait_until(function() return host:output():find("serving 1", 1, true) end, 20, "start-up")
		h.write_file(dir .. "/tagged.lua", "return {\n  name = 'tagged',\n  when = {{\n")
		h.wait_until(function() return host:output():find("keeping the previous version of tagged", 1, true) end,
			10, "the broken save to be reported")
		assert.matches("tagged%.lua:%d+:", host:output())
		append_many(3)
		h.wait_until(function() return applied() == 3 end, 10, "events applied by the old code")
		assert.equal("3", scalar(conn, "SELECT count(*) FROM tagged WHERE tag = 'good'"))
		h.write_file(dir .. "/tagged.lua", tagged("fixed"))
		h.wait_until(function() return host:output():find("tagged reloaded", 1, true) end, 10, "the fixed save")
		append_many(2)
		h.wait_until(function() return applied() == 5 end, 10, "events applied by the fixed code")
		assert.equal("2", scalar(conn, "SELECT count(*) FROM tagged WHERE tag = 'fixed'"))
	end)

	it("starts projections for new files and stops those whose file is deleted, keeping their state", function()
		h.write_file(dir .. "/tagged.lua", tagged("a"))
		append_many(2)
		local host = h.spawn({ "run", "--db", dsn, dir })
		h.wait_until(function() return applied() == 2 end, 20, "the first projection")
		h.write_file(dir .. "/second.lua", [[
return { from = { category = "rl" }, when = { ["*"] = function(s) s.n = (s.n or 0) + 1 end } }
]])
		h.wait_until(function() return host:output():find("second loaded (hash", 1, true) end, 10, "the new file")
		h.wait_until(function()
			return scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'second'") == "2"
		end, 10, "the new projection to catch up")
		os.remove(dir .. "/second.lua")
		h.wait_until(function() return host:output():find("second stopped: its file is gone", 1, true) end, 10,
			"the deleted file")
		append_many(1)
		h.wait_until(function() return applied() == 3 end, 10, "the remaining projection")
		core.sleep(0.5)
		assert.equal("2", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'second'"))
	end)

	it("rebuilds a new version in the shadow and switches over once it caught up, dropping the old one's dead letters", function()
		-- version 1 parks its 7th event; version 2 applies every one
		local function counter(version, step)
			return ([[
return {
	name = "shadowed",
	version = %d,
	from = { category = "rl" },
	when = { ["*"] = function(s, e)
		if %d == 1 and e.version == 7 then error("seventh") end
		s.total = (s.total or 0) + %d
	end },
	on_error = function() return "park" end,
}
]]):format(version, version, step)
		end
		h.write_file(dir .. "/shadowed.lua", counter(1, 1))
		append_many(50)
		local host = h.spawn({ "run", "--db", dsn, dir }, { env = { PROJHOST_BATCH_SIZE = 5 } })
		h.wait_until(function()
			return scalar(conn, "SELECT state->>'total' FROM projhost.checkpoints WHERE projection = 'shadowed'") == "49"
		end, 20, "version 1")
		assert.equal("1", scalar(conn, "SELECT count(*) FROM projhost.parked WHERE projection = 'shadowed'"))
		h.write_file(dir .. "/shadowed.lua", counter(2, 10))
		h.wait_until(function() return host:output():find("version 2 caught up in the shadow: switched over", 1, true) end,
			20, "the switch-over")
		append_many(5)
		h.wait_until(function()
			return scalar(conn, "SELECT state->>'total' FROM projhost.checkpoints WHERE projection = 'shadowed'") == "550"
		end, 20, "version 2 to serve")
		assert.equal("2", scalar(conn, "SELECT version FROM projhost.checkpoints WHERE projection = 'shadowed'"))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.checkpoints WHERE projection LIKE '%@%'"))
		assert.equal("0", scalar(conn, "SELECT count(*) FROM projhost.parked"))
		assert.matches("shadowed@2", host:output(), 1, true)
	end)

	it("rebuilds in place when the projection has reset SQL, ending equal to the truth", function()
		h.write_file(dir .. "/tagged.lua", tagged("v1"))
		append_many(20, "rl-1")
		append_many(10, "rl-2")
		local host = h.spawn({ "run", "--db", dsn, dir })
		h.wait_until(function() return applied() == 30 end, 20, "version 1")
		h.write_file(dir .. "/tagged.lua", tagged("v2", 'version = 2, reset = "TRUNCATE tagged",'))
		h.wait_until(function() return host:output():find("version 1 -> 2: reset", 1, true) end, 10, "the reset")
		h.wait_until(function()
			return scalar(conn, "SELECT count(*) FROM tagged WHERE tag = 'v2'") == "30"
		end, 20, "the rebuild")
		assert.equal("30", scalar(conn, "SELECT count(*) FROM tagged"))
		assert.equal("30", scalar(conn, "SELECT state->>'n' FROM projhost.checkpoints WHERE projection = 'tagged'"))
	end)
end)
