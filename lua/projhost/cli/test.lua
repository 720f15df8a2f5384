-- projhost.cli.test: `projhost test`, busted inside the host runtime.
local util = require "projhost.cli.util"
local say = util.say

local commands = {}

-- busted inside the host runtime. busted's runner raises (error() with no
-- message) when tests failed and it was not started as a standalone script,
-- so the pcall below is how failures come back.
function commands.test(cmd)
	local out = require "projhost.test_output"
	local words = { [0] = "projhost test", "--output=projhost.test_output" }
	for _, w in ipairs(cmd.rest) do words[#words + 1] = w end
	_G.arg = words
	-- The runner names itself after the chunk that calls it ("@projhost").
	local chunk = assert(loadstring(
		"local runner = ... local rc = runner({ standalone = false }) return rc", "@projhost"))
	local ok, err = pcall(chunk, require "busted.runner")
	if not ok and err ~= nil then io.stderr:write("projhost: test: ", tostring(err), "\n") end
	local failed = out.failed()
	if not ok and failed == 0 then
		-- busted stopped before counting anything (bad option, broken helper)
		out.summary_failed = 1
		failed = 1
	end
	if not out.printed then say(out.summary()) end
	return (failed > 0 or not ok) and 1 or 0
end

return commands
