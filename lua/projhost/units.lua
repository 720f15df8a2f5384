-- How figures read to a person, one rule for every place that prints them
-- (status, progress lines, the CLI): durations as "42s", "2m10s", "3h05m".
local M = {}

-- Seconds -> text; "?" for nil, NaN or anything not a number.
function M.duration(s)
	if type(s) ~= "number" or s ~= s then return "?" end
	s = math.floor(math.max(s, 0) + 0.5)
	if s < 60 then return s .. "s" end
	if s < 3600 then return string.format("%dm%02ds", math.floor(s / 60), s % 60) end
	return string.format("%dh%02dm", math.floor(s / 3600), math.floor(s % 3600 / 60))
end

return M
