-- `make install PREFIX=...` (issue 12, "build and packaging"): the binary
-- and the Lua library it loads, found relative to the binary, so the tree
-- works from any PREFIX and any working directory - also moved elsewhere.
local h = require "helpers"

local function sh(cmd)
	local p = io.popen(cmd .. " 2>&1; echo \"rc=$?\"")
	local out = p:read("*a")
	p:close()
	local rc = tonumber(out:match("rc=(%d+)\n$"))
	return rc, out:gsub("rc=%d+\n$", "")
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

describe("make install", function()
	it("installs a binary that finds its own library and runs projections", function()
		local dir = h.tmpdir()
		local rc, out = sh("make -s -C " .. q(h.root) .. " install PREFIX=" .. q(dir .. "/prefix"))
		assert.equal(0, rc, out)
		-- every module of the library is there
		local p = io.popen("cd " .. q(h.root .. "/lua") .. " && find projhost -name '*.lua' | sort")
		for f in p:lines() do
			assert.is_true(h.exists(dir .. "/prefix/share/projhost/lua/" .. f), f .. " not installed")
		end
		p:close()
		-- moved: nothing points back at the checkout or the old PREFIX
		assert(os.rename(dir .. "/prefix", dir .. "/moved"))
		local bin = dir .. "/moved/bin/projhost"
		-- the moved copy, not one the machine may have elsewhere (PH_LUADIR):
		-- mark it, and see the mark
		local cli = dir .. "/moved/share/projhost/lua/projhost/cli/init.lua"
		h.write_file(cli, 'io.stderr:write("moved-library\\n")\n' .. h.read_file(cli))
		rc, out = sh("cd / && env -u PROJHOST_LUADIR " .. q(bin) .. " version")
		assert.equal(0, rc, out)
		assert.matches("^moved%-library\nprojhost %d", out)

		local dsn = h.fresh_db("install")
		local conn = h.connect(dsn)
		assert(require("projhost.schema").migrate(conn))
		assert(conn:query("SELECT projhost.append('inst-1', NULL, '[{\"type\":\"A\"},{\"type\":\"A\"}]')"))
		h.write_file(dir .. "/count.lua", [[
return {
	name = "installed_count",
	from = { category = "inst" },
	init = function() return { n = 0 } end,
	when = { A = function(s) s.n = s.n + 1 end },
}
]])
		rc, out = sh("cd / && env -u PROJHOST_LUADIR " .. q(bin) .. " run --once --db " .. q(dsn) .. " " .. q(dir .. "/count.lua"))
		assert.equal(0, rc, out)
		assert.equal("2", h.scalar(conn, [[SELECT state->>'n' FROM projhost.checkpoints
			WHERE projection = 'installed_count' AND partition = '']]))
		conn:close()
	end)
end)
