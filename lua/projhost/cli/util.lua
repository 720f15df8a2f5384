-- projhost.cli.util: what every command group shares - its one-line
-- failures and output, the database it opens (resolve, connect, migrate),
-- JSON objects from the command line, aligned tables, names it knows.
local cjson = require "projhost.json"

local M = {}

-- Control characters of what people typed (and of anything else quoted
-- in a message) are shown escaped, by the log's own rule (core.escape).
function M.escape(s, max)
	return require("projhost.core").escape(s, max)
end
local escape = M.escape

-- One line, whatever the message holds (a multi-line one shows its
-- newlines escaped).
function M.fail(what, msg)
	io.stderr:write("projhost: ", what, ": ", escape((tostring(msg):gsub("%s+$", ""))), "\n")
	return 1
end

function M.say(...)
	io.stdout:write(...)
	io.stdout:write("\n")
end

-- Resolve the DSN (design §4), connect, migrate. -> conn, dsn | nil, msg
function M.open_db(cmd)
	local embedded = require "projhost.embedded"
	local dsn, err = embedded.resolve{
		db = cmd.flags.db,
		on_start = function(_, home)
			io.stderr:write("projhost: started the embedded PostgreSQL in ", escape(home),
				" (projhost db stop stops it)\n")
		end,
	}
	if not dsn then return nil, err end
	local core = require "projhost.core"
	local conn, code
	conn, err, code = core.connect(dsn)
	if not conn then return nil, err, code end
	local function note(text) io.stderr:write("projhost: ", escape(text), "\n") end
	local ok
	ok, err, code = require("projhost.schema").migrate(conn, note)
	if not ok then
		conn:close()
		return nil, err, code
	end
	-- an index build failed: reads work, slower; the next start retries
	if err then note(err .. " (reads go on without it; the next start builds it again)") end
	return conn, dsn
end

-- Returns the JSON text when it decodes to an object (not an array/scalar).
function M.json_object(text)
	local ok, v = pcall(cjson.decode, text)
	if not ok then return nil, (tostring(v):gsub("^.-:%d+: ", "")) end
	-- cjson decodes {} and [] alike, so look at the text itself.
	if type(v) ~= "table" or not text:match("^%s*{") then
		return nil, "expected a JSON object, got " .. (type(v) == "table" and "an array" or text)
	end
	return v
end

function M.exe_path()
	return require("projhost.core").exepath() or arg and arg[0] or "projhost"
end

-- A table of rows as aligned columns; cols = { {key, title, max?}, ... }:
-- every cell escaped (no control character reaches the terminal, a row
-- stays one line), and cut at max bytes when the column has one.
function M.print_table(rows, cols)
	local width, cells = {}, {}
	for i, r in ipairs(rows) do
		cells[i] = {}
		for c, col in ipairs(cols) do cells[i][c] = escape(tostring(r[col[1]] or ""), col[3]) end
	end
	for c, col in ipairs(cols) do
		width[c] = #col[2]
		for i = 1, #rows do width[c] = math.max(width[c], #cells[i][c]) end
	end
	local function line(get)
		local parts = {}
		for c = 1, #cols do
			local s = get(c)
			parts[c] = c == #cols and s or s .. string.rep(" ", width[c] - #s)
		end
		M.say((table.concat(parts, "  "):gsub("%s+$", "")))
	end
	line(function(c) return cols[c][2] end)
	for i = 1, #rows do line(function(c) return cells[i][c] end) end
end

-- A number of seconds for people (one rule: projhost.units).
M.duration = require("projhost.units").duration

-- A name is known when projhost.checkpoints has it (a projection that has
-- run at least once). -> true | nil, "no projection named X (known: ...)"
function M.known(conn, name)
	local rows, msg = conn:query("SELECT DISTINCT projection FROM projhost.checkpoints ORDER BY 1")
	if not rows then return nil, msg end
	local names = {}
	for i, r in ipairs(rows) do
		if r.projection == name then return true end
		names[i] = r.projection
	end
	return nil, ("no projection named %s (known: %s)"):format(name, #names > 0 and table.concat(names, ", ") or "none")
end

return M
