-- projhost.guard: calling code the host does not trust (projection scripts)
-- so that nothing it does can hang the caller or crash it on the way back.
--
--   guard.call(budget, fn, ...) -> true, ...results | false, msg, kind
--       kind: "error" | "budget" | "memory"; msg is always a string.
--   guard.errtext(v)            -> v as text, whatever v is (never raises,
--                                  never runs away)
--   guard.protect_strings()     -> string methods without dump, VM-wide
--
-- The budget is enforced in-process with a count hook (the master's
-- SIGKILL stays the backstop for what a hook cannot see: a long C call
-- such as a huge string.rep or a pathological pattern match).
local M = {}

-- Instructions between two looks at the clock: one clock_gettime per
-- 10,000 VM instructions costs nothing measurable, and overruns by at most
-- a few microseconds.
local COUNT = 10000
-- Once the deadline has passed, look much more often, and at every call:
-- pcall is a call, so a script that swallows the overrun with pcall(...)
-- is stopped at its next pcall, before that pcall can protect anything.
local OVER_COUNT = 100

-- Longest text errtext returns (bytes). Error messages end up in log lines,
-- in status and in the parked table; a 100 MB error string must not.
M.MAX_TEXT = 16384

-- Seconds an error object's __tostring may run when errtext converts it.
M.TOSTRING_BUDGET = 1

local monotime
do
	local ok, core = pcall(require, "projhost.core")
	monotime = ok and type(core) == "table" and core.monotime or os.clock
end

local jit = rawget(_G, "jit")
local getinfo, sethook, gethook = debug.getinfo, debug.sethook, debug.gethook
local getmetatable_raw = debug.getmetatable
local huge = math.huge

---------------------------------------------------------------------------
-- errtext

-- s cut to MAX_TEXT bytes, never inside a UTF-8 sequence.
local function clip(s)
	local n = #s
	if n <= M.MAX_TEXT then return s end
	local cut = M.MAX_TEXT
	-- back off over continuation bytes (10xxxxxx) to the start of a character
	while cut > 0 and s:byte(cut + 1) and s:byte(cut + 1) >= 0x80 and s:byte(cut + 1) < 0xC0 do
		cut = cut - 1
	end
	return s:sub(1, cut) .. " ... (" .. n .. " bytes in all)"
end

-- v as text without calling anything of v's.
local function plain_text(v)
	local tv = type(v)
	if tv == "string" then return clip(v) end
	if tv == "number" then return tostring(v) end
	return "(error object is a " .. tv .. " value)"
end

local converting = false -- errtext is running a __tostring

local call -- below

-- Any value as text, for messages. Strings and numbers as they are (cut to
-- MAX_TEXT); a value with a __tostring (found with debug.getmetatable, so a
-- __metatable field does not hide it) through it, run under its own small
-- budget; anything else, or a __tostring that fails, returns a non-string
-- or loops, is named by its type. An error object raised by a __tostring is
-- named by its type only, so a chain of them cannot recurse.
function M.errtext(v)
	local tv = type(v)
	if tv == "string" or tv == "number" or converting then return plain_text(v) end
	local mt = getmetatable_raw(v)
	local ts = type(mt) == "table" and rawget(mt, "__tostring") or nil
	if ts == nil then return plain_text(v) end
	converting = true
	-- pcall: even if call() itself failed (out of memory in its
	-- bookkeeping), converting must be reset
	local pok, ok, s = pcall(call, M.TOSTRING_BUDGET, ts, v)
	converting = false
	if not pok then return plain_text(v) end
	if not ok then
		return "(error object is a " .. tv .. " value; its __tostring failed: " .. s .. ")"
	end
	if type(s) == "number" then return tostring(s) end
	if type(s) ~= "string" then
		return "(error object is a " .. tv .. " value; its __tostring returned a " .. type(s) .. ")"
	end
	return clip(s)
end
local errtext = M.errtext

---------------------------------------------------------------------------
-- call

-- The innermost running call: { deadline =, budget =, outer =, overran = }.
-- deadline is the sooner of this call's and the outer call's, and budget
-- the one that set it (named in the message).
local current

local function overrun_msg(budget)
	return ("overran its budget of %gs"):format(budget)
end

-- Functions of this module: the hook never raises inside them, so call()
-- always gets to restore what it changed.
local ours = {}

local function hook()
	local f = current
	if not f or f.deadline == huge then return end
	local now = monotime()
	if now < f.deadline then return end
	-- Not while our own code runs (call()'s bookkeeping), nor in a C
	-- function it called (pcall, debug.sethook).
	local info = getinfo(2, "fS")
	if info and (ours[info.func] or info.what == "C" and ours[(getinfo(3, "f") or {}).func]) then
		return
	end
	if not f.overran then
		-- every call whose deadline has passed has overrun, not only this one
		local g = f
		while g do
			if g.deadline <= now then g.overran = true end
			g = g.outer
		end
		sethook(hook, "c", OVER_COUNT)
	end
	error(overrun_msg(f.budget), 0)
end

local function finish(frame, hf, hm, hc, jit_was_on, ok, ...)
	if hf then sethook(hf, hm, hc) else sethook() end
	current = frame.outer
	if jit_was_on then jit.on() end
	if frame.overran then return false, overrun_msg(frame.budget), "budget" end
	if ok then return true, ... end
	local msg = errtext((...))
	if msg:find("not enough memory", 1, true) then return false, msg, "memory" end
	return false, msg, "error"
end

-- Run fn(...) for at most `budget` seconds (0: no limit of its own; an
-- outer call's limit still holds). While it runs the JIT is off and its
-- traces are flushed: LuaJIT's count hook does not fire inside compiled
-- code, and jit.off() alone leaves existing traces running (measured: a
-- loop compiled before the call ignored the hook with jit.off(), stopped
-- with jit.off() + jit.flush()). The previous hook and JIT mode are put
-- back when fn returns, so calls nest.
function M.call(budget, fn, ...)
	if type(budget) ~= "number" or budget ~= budget or budget < 0 then
		error("guard.call: budget must be a number of seconds >= 0 (got " .. tostring(budget) .. ")", 2)
	end
	local outer = current
	local deadline, named = huge, budget
	if budget > 0 and budget < huge then deadline = monotime() + budget end
	if outer and outer.deadline <= deadline then deadline, named = outer.deadline, outer.budget end
	local frame = { deadline = deadline, budget = named, outer = outer, overran = false }
	local hf, hm, hc = gethook()
	if type(hf) ~= "function" then hf = nil end
	local jit_was_on = false
	if deadline < huge and jit and jit.status() then
		jit.off()
		jit.flush()
		jit_was_on = true
	end
	current = frame
	if deadline < huge then sethook(hook, "", COUNT) end
	return finish(frame, hf, hm, hc, jit_was_on, pcall(fn, ...))
end
call = M.call

ours[M.call] = true
ours[finish] = true
ours[hook] = true
ours[M.errtext] = true

---------------------------------------------------------------------------
-- xpcall for scripts

local function xfinish(handler, ok, ...)
	if ok then return true, ... end
	return false, select(2, pcall(handler, (...)))
end

-- xpcall(f, handler, ...) as scripts know it, except that the handler runs
-- after the error has unwound the stack, not at the point of the error.
-- Why: when the error is call()'s overrun, raised from its hook, LuaJIT
-- runs a real xpcall handler inside the hook, where hooks are off (found
-- by a spec: `while true do xpcall(spin, spin) end` ran for ever). Scripts
-- have no debug library, so running the handler later changes nothing they
-- can see; an error in the handler is returned like the error it handled.
function M.xpcall(f, handler, ...)
	return xfinish(handler, pcall(f, ...))
end

---------------------------------------------------------------------------
-- protect_strings

local protected = false

-- The string metatable is one per VM: its __index is what ("").x finds in
-- every script and in the host. Replace it, once, with a copy of the string
-- library without dump (bytecode could be made, and bytecode is not
-- accepted; nothing in the host uses string.dump). The host's own `string`
-- table keeps dump; scripts see neither (their getmetatable("") is nil).
function M.protect_strings()
	if protected then return end
	local mt = getmetatable_raw("")
	local from = type(mt.__index) == "table" and mt.__index or string
	local safe = {}
	for k, v in pairs(from) do
		if k ~= "dump" then safe[k] = v end
	end
	mt.__index = safe
	protected = true
end

return M
