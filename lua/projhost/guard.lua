-- projhost.guard: protected calls into projection code outside handlers
-- (placeholder until the sandbox branch lands: pcall and safe error text).
local M = {}

function M.errtext(v)
	if type(v) == "string" then return v end
	local ok, s = pcall(tostring, v)
	if ok and type(s) == "string" then return s end
	return "(an error object of type " .. type(v) .. ")"
end

function M.call(_, fn, ...)
	local r = { pcall(fn, ...) }
	if r[1] then return unpack(r, 1, table.maxn(r)) end
	return false, M.errtext(r[2]), "error"
end

return M
