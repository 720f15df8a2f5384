-- projhost.guard: running code the host does not trust (projection scripts)
-- under a budget, and turning any error object into text without running
-- away. Budgets here are small (0.05-0.3 s) so the suite stays quick; no
-- assertion is about how long anything took.
local guard = require "projhost.guard"

local function spin() while true do end end
local function pack(...) return { n = select("#", ...), ... } end

describe("projhost.guard", function()
	describe("call", function()
		it("returns true and every result of a function that finishes", function()
			local r = pack(guard.call(1, function(a, b) return a, nil, b end, 1, 3))
			assert.same({ n = 4, true, 1, nil, 3 }, r)
			assert.same({ true, 2 }, { guard.call(1, function(...) return select("#", ...) end, nil, nil) })
		end)

		it("returns false, the message and kind 'error' for an error", function()
			local ok, msg, kind = guard.call(1, function() error("boom", 0) end)
			assert.same({ false, "boom", "error" }, { ok, msg, kind })
		end)

		it("stops an endless loop once the budget is spent", function()
			local ok, msg, kind = guard.call(0.05, spin)
			assert.is_false(ok)
			assert.equal("overran its budget of 0.05s", msg)
			assert.equal("budget", kind)
		end)

		it("stops a loop the JIT compiled before the call (jit.off alone would not)", function()
			-- warm the loop up until LuaJIT has a trace for it
			local function count(n) local x = 0 for i = 1, n do x = x + i end return x end
			for _ = 1, 100 do count(1e4) end
			local ok, msg, kind = guard.call(0.05, count, 1e15)
			assert.same({ false, "overran its budget of 0.05s", "budget" }, { ok, msg, kind })
		end)

		it("is not fooled by a script that swallows the overrun with pcall", function()
			local ok, msg, kind = guard.call(0.05, function()
				while true do pcall(spin) end
			end)
			assert.same({ false, "overran its budget of 0.05s", "budget" }, { ok, msg, kind })
		end)

		it("is not fooled by pcall in a tight loop without calls in between", function()
			local ok, _, kind = guard.call(0.05, function()
				local n = 0
				while true do
					local okp = pcall(function() for _ = 1, 1e6 do n = n + 1 end end)
					if not okp then n = 0 end
				end
			end)
			assert.is_false(ok)
			assert.equal("budget", kind)
		end)

		it("is not fooled by guard.xpcall (the sandbox's) whose handler loops too", function()
			local ok, _, kind = guard.call(0.05, function()
				while true do guard.xpcall(spin, spin) end
			end)
			assert.is_false(ok)
			assert.equal("budget", kind)
		end)

		it("reports the overrun even when the script caught it and returned", function()
			local ok, msg, kind = guard.call(0.05, function()
				pcall(spin)
				return "I finished"
			end)
			assert.same({ false, "overran its budget of 0.05s", "budget" }, { ok, msg, kind })
		end)

		it("covers coroutines the function runs", function()
			local ok, _, kind = guard.call(0.05, function()
				local co = coroutine.create(spin)
				coroutine.resume(co)
				return "resumed"
			end)
			assert.is_false(ok)
			assert.equal("budget", kind)
		end)

		it("maps 'not enough memory' to kind 'memory'", function()
			local ok, msg, kind = guard.call(1, function() error("not enough memory", 0) end)
			assert.same({ false, "not enough memory", "memory" }, { ok, msg, kind })
			ok, msg, kind = guard.call(1, function() error("not enough memory") end)
			assert.is_false(ok)
			assert.matches("not enough memory$", msg)
			assert.equal("memory", kind)
		end)

		it("turns any error object into a string", function()
			for _, v in ipairs({ { {} }, { nil }, { true }, { coroutine.create(spin) }, { 42 } }) do
				local ok, msg, kind = guard.call(1, function() error(v[1]) end)
				assert.is_false(ok)
				assert.is_string(msg)
				assert.equal("error", kind)
			end
		end)

		it("with budget 0 runs without a limit", function()
			assert.same({ true, 5 }, { guard.call(0, function() return 5 end) })
		end)

		it("nests: the inner call gets its own budget and restores the outer one", function()
			local inner
			local ok, msg, kind = guard.call(0.3, function()
				inner = { guard.call(0.05, spin) }
				spin()
			end)
			assert.same({ false, "overran its budget of 0.05s", "budget" }, inner)
			assert.same({ false, "overran its budget of 0.3s", "budget" }, { ok, msg, kind })
		end)

		it("nests: an inner call cannot outlast the outer budget", function()
			local inner
			local ok, _, kind = guard.call(0.05, function()
				inner = { guard.call(100, spin) }
				return "after inner"
			end)
			assert.is_false(ok)
			assert.equal("budget", kind)
			assert.is_false(inner[1])
			assert.equal("budget", inner[3])
		end)

		it("restores the hook and the JIT mode it found", function()
			local function h() end
			debug.sethook(h, "", 1e6)
			jit.on()
			guard.call(0.05, spin)
			guard.call(1, function() end)
			local f, mask, count = debug.gethook()
			debug.sethook()
			assert.equal(h, f)
			assert.equal("", mask)
			assert.equal(1e6, count)
			assert.is_true((jit.status()))
			jit.off()
			guard.call(1, function() end)
			assert.is_false((jit.status()))
			jit.on()
		end)

		it("leaves no hook behind", function()
			guard.call(0.05, spin)
			assert.is_nil((debug.gethook()))
		end)

		it("rejects a bad budget (a programmer error)", function()
			for _, b in ipairs({ -1, 0 / 0, "1", math.huge * 0 }) do
				assert.has_error(function() guard.call(b, function() end) end)
			end
		end)
	end)

	describe("errtext", function()
		it("keeps strings and numbers", function()
			assert.equal("boom", guard.errtext("boom"))
			assert.equal("42", guard.errtext(42))
		end)

		it("names other values without calling anything", function()
			assert.equal("(error object is a nil value)", guard.errtext(nil))
			assert.equal("(error object is a boolean value)", guard.errtext(false))
			assert.equal("(error object is a table value)", guard.errtext({}))
			assert.equal("(error object is a thread value)", guard.errtext(coroutine.create(spin)))
			assert.equal("(error object is a function value)", guard.errtext(spin))
		end)

		it("uses __tostring", function()
			assert.equal("custom", guard.errtext(setmetatable({}, { __tostring = function() return "custom" end })))
		end)

		it("finds __tostring behind a __metatable field", function()
			local v = setmetatable({}, { __tostring = function() return "hidden" end, __metatable = false })
			assert.equal("hidden", guard.errtext(v))
		end)

		it("survives a __tostring that raises, returns a non-string or loops", function()
			local raising = setmetatable({}, { __tostring = function() error("no text for you", 0) end })
			assert.equal("(error object is a table value; its __tostring failed: no text for you)",
				guard.errtext(raising))
			local odd = setmetatable({}, { __tostring = function() return {} end })
			assert.equal("(error object is a table value; its __tostring returned a table)", guard.errtext(odd))
			local looping = setmetatable({}, { __tostring = spin })
			local saved = guard.TOSTRING_BUDGET
			guard.TOSTRING_BUDGET = 0.05
			local text = guard.errtext(looping)
			guard.TOSTRING_BUDGET = saved
			assert.equal("(error object is a table value; its __tostring failed: overran its budget of 0.05s)", text)
		end)

		it("does not recurse into error objects raised by __tostring", function()
			local mt = {}
			mt.__tostring = function(self) error(setmetatable({}, mt)) end
			local text = guard.errtext(setmetatable({}, mt))
			assert.equal("(error object is a table value; its __tostring failed: (error object is a table value))", text)
		end)

		it("clips a huge message at a UTF-8 boundary and says how long it was", function()
			local big = ("é"):rep(100000)
			local text = guard.errtext(big)
			assert.is_true(#text < guard.MAX_TEXT + 100)
			assert.matches("%.%.%. %(200000 bytes in all%)$", text)
			local body = text:match("^(.-) %.%.%. %(")
			assert.equal(0, #body % 2) -- whole two-byte characters only
			local huge = setmetatable({}, { __tostring = function() return big end })
			assert.matches("%(200000 bytes in all%)$", guard.errtext(huge))
		end)
	end)

	describe("xpcall", function()
		it("returns f's results, or false and what the handler made of the error", function()
			assert.same({ true, 1, 2 }, { guard.xpcall(function(a, b) return a, b end, error, 1, 2) })
			assert.same({ false, "handled: boom" },
				{ guard.xpcall(function() error("boom", 0) end, function(e) return "handled: " .. e end) })
			assert.same({ false, "again" },
				{ guard.xpcall(function() error("boom", 0) end, function() error("again", 0) end) })
		end)
	end)

	describe("protect_strings", function()
		it("takes dump out of the string methods, once, keeping the rest", function()
			guard.protect_strings()
			guard.protect_strings()
			assert.is_nil(("").dump)
			assert.equal("ABC", ("abc"):upper())
			assert.is_function(string.dump) -- the host's own string table is untouched
			assert.not_equal(string, getmetatable("").__index)
		end)
	end)
end)
