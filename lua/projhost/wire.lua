-- The worker's side of the master/worker messages; the grammar, the verbs
-- and the size budgets are described once, in core/proto.h (the master's
-- side is core/proto.c).
--
-- A message is lines separated by "\n"; a line is a verb and its fields
-- separated by "\t"; every field is escaped ("\\" -> "\\\\", tab -> "\\t",
-- newline -> "\\n"), so a field may hold any byte but NUL.
local M = {}

-- core/proto.h PH_PROTO_BUDGET and PH_PROTO_ERROR_MAX
M.BUDGET = 1024 * 1024
M.ERROR_MAX = 4096

local ESC = { ["\\"] = "\\\\", ["\t"] = "\\t", ["\n"] = "\\n" }
local UNESC = { ["\\"] = "\\", t = "\t", n = "\n" }

function M.escape(s)
	s = tostring(s)
	if not s:find("[\\\t\n]") then return s end
	return (s:gsub("[\\\t\n]", ESC))
end

-- A backslash before any other byte stays as it is (as in C).
function M.unescape(s)
	if not s:find("\\", 1, true) then return s end
	return (s:gsub("\\(.)", function(c) return UNESC[c] or "\\" .. c end))
end

-- One line: verb and fields (strings or numbers), escaped.
function M.line(verb, ...)
	local t = { verb }
	for i = 1, select("#", ...) do t[i + 1] = M.escape((select(i, ...))) end
	return table.concat(t, "\t")
end

-- The lines of a message: { { verb, field1, ... }, ... }, fields unescaped.
function M.parse(msg)
	local lines = {}
	for l in (msg .. "\n"):gmatch("([^\n]*)\n") do
		if l ~= "" then
			local f = {}
			for field in (l .. "\t"):gmatch("([^\t]*)\t") do
				f[#f + 1] = #f == 0 and field or M.unescape(field)
			end
			lines[#lines + 1] = f
		end
	end
	return lines
end

-- s cut to at most n bytes (an error message on one line).
function M.truncate(s, n)
	s = tostring(s)
	if #s <= n then return s end
	return s:sub(1, n - 3) .. "..."
end

return M
