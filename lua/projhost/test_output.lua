-- projhost.test_output: busted output handler for `projhost test`.
--
-- Prints a character per test while running (. ok, F failure, E error,
-- P pending), then the failures and errors with where they happened, then
-- as its last line exactly "N passed, N failed" (errors count as failed,
-- pending does not) so CI and people read one line.
--
-- It is a callable table rather than a function so `projhost test` can ask
-- it for the counts after busted returns (M.failed(), M.printed).
local M = { printed = false, summary_failed = 0 }

local handler

function M.failed()
	if not handler then return M.summary_failed end
	return handler.failuresCount + handler.errorsCount + M.summary_failed
end

function M.summary()
	local passed = handler and handler.successesCount or 0
	return ("%d passed, %d failed"):format(passed, M.failed())
end

local function describe(item, kind, verbose)
	local trace = item.element and item.element.trace or item.trace
	local where = trace and trace.short_src and (trace.short_src .. ":" .. tostring(trace.currentline)) or "?"
	local msg = item.message
	if type(msg) ~= "string" then msg = msg == nil and "(no message)" or require("pl.pretty").write(msg) end
	local text = ("%s %s: %s\n  %s"):format(kind, where, item.name or "?", msg:gsub("\n", "\n  "))
	if verbose and item.trace and item.trace.traceback then text = text .. "\n" .. item.trace.traceback end
	return text
end

setmetatable(M, { __call = function(_, options)
	local busted = require "busted"
	handler = require("busted.outputHandlers.base")()
	M.printed = false

	local marks = { success = ".", failure = "F", error = "E", pending = "P" }

	handler.testEnd = function(_, _, status)
		io.write(marks[status] or "?")
		io.flush()
		return nil, true
	end

	-- errors outside an `it` (a spec file that does not load, a failing
	-- setup) have no test end; mark them too
	handler.fileError = function()
		io.write("E")
		io.flush()
		return nil, true
	end

	handler.suiteEnd = function()
		io.write("\n")
		for _, f in ipairs(handler.failures) do io.write("\n", describe(f, "FAIL", options.verbose), "\n") end
		for _, e in ipairs(handler.errors) do io.write("\n", describe(e, "ERROR", options.verbose), "\n") end
		io.write(M.summary(), "\n")
		io.flush()
		M.printed = true
		return nil, true
	end

	busted.subscribe({ "test", "end" }, handler.testEnd, { predicate = handler.cancelOnPending })
	busted.subscribe({ "suite", "end" }, handler.suiteEnd)
	busted.subscribe({ "error", "file" }, handler.fileError)
	busted.subscribe({ "failure", "file" }, handler.fileError)
	busted.subscribe({ "error", "describe" }, handler.fileError)
	busted.subscribe({ "failure", "describe" }, handler.fileError)
	return handler
end })

return M
