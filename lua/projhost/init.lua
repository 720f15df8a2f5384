-- require "projhost": the Lua library of the projection host.
--
--   local projhost = require "projhost"
--   local def, err = projhost.load("projections/balances.lua")   -- nil, "file:line: reason"
--   local T = projhost.testing                                   -- given/when/then, no database
--
-- The host itself (`projhost run`) lives in the binary; this module is what
-- projection authors and tools use from plain LuaJIT or busted.
local M = {}

local lazy = {
	version = function() return require("projhost.core").version end,
	load = function() return require("projhost.loader").load_file end,
	load_paths = function() return require("projhost.loader").load_paths end,
	testing = function() return require "projhost.testing" end,
	core = function() return require "projhost.core" end,
}

return setmetatable(M, {
	__index = function(t, k)
		local f = lazy[k]
		if not f then return nil end
		local v = f()
		rawset(t, k, v)
		return v
	end,
})
