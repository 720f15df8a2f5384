-- projhost.cli.append: `projhost append`, one event or an NDJSON file
-- loaded in one transaction.
local cjson = require "projhost.json"
local util = require "projhost.cli.util"
local fail, say, open_db, json_object = util.fail, util.say, util.open_db, util.json_object

local commands = {}

local CHUNK = 5000
local STAGE = "SELECT projhost.stage_events($1::jsonb, $2::bigint[]) AS n"

local function as_array(chunk, n)
	return "[" .. table.concat(chunk, ",", 1, n or #chunk) .. "]"
end

local function as_ords(lines, n)
	return "{" .. table.concat(lines, ",", 1, n or #lines) .. "}"
end

-- Which element of a chunk that failed to stage (message msg, SQLSTATE
-- code) made it fail? Only on the failure path, so the bulk path stays one
-- statement per chunk: the load's transaction is aborted and is rolled
-- back (the file is one transaction: nothing of it can commit any more),
-- and in a fresh one, rolled back as well, ever shorter prefixes of the
-- chunk are staged in a savepoint (a binary search: ~13 tries for 5,000
-- lines) - a prefix fails once it holds the first failing element.
-- Staging touches nothing but the chunk, so the chunk alone fails again.
-- -> index, message of that failure, its code | nil (not found)
local function failing_element(conn, chunk, lines)
	conn:exec("ROLLBACK")
	if not conn:exec("BEGIN") then return nil end
	local broken = false -- a probe that could not run proves nothing
	local function fails(n)
		if not conn:exec("SAVEPOINT probe") then
			broken = true
			return false
		end
		local rows, m, c = conn:query(STAGE, as_array(chunk, n), as_ords(lines, n))
		if not conn:exec("ROLLBACK TO SAVEPOINT probe") then broken = true end
		if rows then return false end
		return true, m, c
	end
	local bad, msg, code = fails(#chunk)
	if broken or not bad then return nil end
	local lo, hi = 1, #chunk
	while lo < hi do
		local mid = math.floor((lo + hi) / 2)
		local m, c
		bad, m, c = fails(mid)
		if broken then return nil end
		if bad then
			hi, msg, code = mid, m, c
		else
			lo = mid + 1
		end
	end
	return lo, msg, code
end

-- The line of the staged event behind a failure of append_staged (the
-- transaction is back at the savepoint before it, so the staged rows are
-- there to look at): for a duplicate "id" (23505, the one conflict that
-- checks cannot see) the key in the message names it - the first line
-- with an id already in the store, else the second line with the id.
-- -> line | nil
local function failing_line(conn, msg, code)
	local key = code == "23505" and msg:match("%(event_id%)=%(([^)]*)%)")
	if not key then return nil end
	local rows = conn:query([[SELECT ord, EXISTS (SELECT 1 FROM projhost.events WHERE event_id = $1::uuid) AS taken
		FROM pg_temp.projhost_staged WHERE (e->>'id')::uuid = $1::uuid ORDER BY ord LIMIT 2]], key)
	if not rows or not rows[1] then return nil end
	local r = (rows[1].taken == "t" or not rows[2]) and rows[1] or rows[2]
	return tonumber(r.ord)
end

-- NDJSON bulk load: the whole file in one transaction. Chunks of CHUNK
-- lines are checked and staged (projhost.stage_events, with their line
-- numbers), then one projhost.append_staged moves them all into the store,
-- so each stream's row is written once per file and the streams are
-- locked once, in order. Lines are sent as they are (once they parse as
-- JSON objects) so the server parses numbers and empty arrays exactly as
-- written, and checks them (projhost.check_events, the one home of those
-- rules). Every error names the file's line: the server's event checks
-- give an index into the chunk, anything else staging
-- finds (e.g. "\u0000", 22P05; a bad UUID, 22P02) is located by
-- failing_element, and a duplicate id at the end by failing_line.
-- After the commit, tables the load grew are analyzed (analyze_if_grown).
local function append_file(conn, file, default_stream)
	local name = file == "-" and "stdin" or file
	local fh, err
	if file == "-" then
		fh = io.stdin
	else
		fh, err = io.open(file, "rb")
		if not fh then return nil, "cannot read " .. err end
	end
	local ok, msg = conn:exec("BEGIN")
	if not ok then return nil, msg end
	local lineno, chunk, lines, first = 0, {}, {}, nil
	local function abort(m)
		conn:exec("ROLLBACK")
		if fh ~= io.stdin then fh:close() end
		return nil, m
	end
	local function flush()
		if #chunk == 0 then return true end
		local rows, m, code = conn:query(STAGE, as_array(chunk), as_ords(lines))
		if not rows then
			-- the server's own event checks name a 0-based element index
			local idx, rest = m:match("event at index (%d+): (.*)$")
			if idx and lines[tonumber(idx) + 1] then
				return nil, ("%s:%d: %s"):format(name, lines[tonumber(idx) + 1], rest)
			end
			local at, why, c = failing_element(conn, chunk, lines)
			if not at then
				return nil, ("%s:%d-%d: %s [%s]"):format(name, lines[1], lines[#lines], m, tostring(code))
			end
			-- a prefix may have met those checks first (index = its element)
			rest = why:match("event at index %d+: (.*)$")
			if rest then return nil, ("%s:%d: %s"):format(name, lines[at], rest) end
			return nil, ("%s:%d: %s [%s]"):format(name, lines[at], why, tostring(c))
		end
		first = first or lines[1]
		chunk, lines = {}, {}
		return true
	end
	for line in fh:lines() do
		lineno = lineno + 1
		-- a UTF-8 byte order mark is no part of the first line's JSON
		if lineno == 1 then line = line:gsub("^\239\187\191", "") end
		if line:match("%S") then
			local dec, ev = pcall(cjson.decode, line)
			if not dec then
				return abort(("%s:%d: invalid JSON: %s"):format(name, lineno, (tostring(ev):gsub("^.-:%d+: ", ""))))
			end
			if type(ev) ~= "table" or not line:match("^%s*{") then
				return abort(("%s:%d: expected a JSON object"):format(name, lineno))
			end
			-- the events' checks are the server's (projhost.stage_events):
			-- its error names the element, mapped to its line below
			if ev.stream == nil and default_stream then
				local sep = next(ev) == nil and "" or ","
				line = line:gsub("^%s*{", function() return '{"stream":' .. cjson.encode(default_stream) .. sep end, 1)
			end
			chunk[#chunk + 1] = line
			lines[#lines + 1] = lineno
			if #chunk >= CHUNK then
				local sent, m = flush()
				if not sent then return abort(m) end
			end
		end
	end
	local sent, m = flush()
	if not sent then return abort(m) end
	if fh ~= io.stdin then fh:close() end
	if not first then
		conn:exec("ROLLBACK")
		return 0
	end
	ok, msg = conn:exec("SAVEPOINT load")
	if not ok then return abort(msg) end
	local rows, code
	rows, msg, code = conn:query("SELECT projhost.append_staged() AS n")
	if not rows then
		local at = conn:exec("ROLLBACK TO SAVEPOINT load") and failing_line(conn, msg, code)
		conn:exec("ROLLBACK")
		if at then return nil, ("%s:%d: %s [%s]"):format(name, at, msg, tostring(code)) end
		return nil, ("%s:%d-%d: %s [%s]"):format(name, first, lineno, msg, tostring(code))
	end
	ok, msg = conn:exec("COMMIT")
	if not ok then return nil, msg end
	-- outside the load's transaction (see analyze_if_grown); the load is in
	-- whatever this says
	local analyzed, why = conn:query("SELECT analyzed FROM projhost.analyze_if_grown()")
	if not analyzed then fail("append", "loaded, but analyzing afterwards failed: " .. why) end
	return tonumber(rows[1].n)
end

function commands.append(cmd)
	local stream, etype, data = cmd.args[1], cmd.args[2], cmd.args[3]
	local meta = cmd.flags.metadata
	if not cmd.flags.file then
		data = data or "{}"
		local ok, why = json_object(data)
		if not ok then return fail("append", "invalid JSON data: " .. why) end
		if meta then
			ok, why = json_object(meta)
			if not ok then return fail("append", "invalid JSON metadata: " .. why) end
		end
	end
	local conn, err = open_db(cmd)
	if not conn then return fail("append", err) end
	if cmd.flags.file then
		local n, msg = append_file(conn, cmd.flags.file, stream)
		conn:close()
		if not n then return fail("append", msg) end
		say(("appended %d events"):format(n))
		return 0
	end
	-- The validated JSON texts are spliced in verbatim: re-encoding decoded
	-- values would turn [] into {} and round big integers.
	local events = '[{"type":' .. cjson.encode(etype) .. ',"data":' .. data
		.. ',"metadata":' .. (meta or "{}") .. "}]"
	local rows, msg = conn:query("SELECT projhost.append($1, $2, $3::jsonb) AS version",
		stream, cmd.flags["expected-version"], events)
	conn:close()
	if not rows then return fail("append", msg) end
	say(rows[1].version)
	return 0
end

return commands
