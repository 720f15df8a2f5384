local loader = require "projhost.loader"

local FIX = "spec/fixtures/projections/"
local BAD = FIX .. "bad/"

-- Load a bad fixture and return its error, failing if it loaded.
local function load_error(name)
	local def, err = loader.load_file(BAD .. name .. ".lua")
	assert.is_nil(def)
	assert.is_string(err)
	return err
end

-- Plain-text prefix check (paths contain pattern characters).
local function starts_with(prefix, s)
	assert.equal(prefix, s:sub(1, #prefix), "expected '" .. s .. "' to start with '" .. prefix .. "'")
end

local function tmpdir()
	local dir = os.tmpname()
	os.remove(dir)
	local rc = os.execute("mkdir -p '" .. dir .. "'")
	assert(rc == 0 or rc == true, "mkdir failed")
	return dir
end

local function write(path, text)
	local f = assert(io.open(path, "w"))
	f:write(text)
	f:close()
end

describe("projhost.loader", function()
	describe("load_file on a good file", function()
		local def = assert(loader.load_file(FIX .. "alpha.lua"))

		it("keeps the declared fields", function()
			assert.equal("alpha", def.name)
			assert.equal(3, def.version)
			assert.equal(FIX .. "alpha.lua", def.file)
			assert.same({ category = "account" }, def.from)
			assert.same({ "Opened", "Deposited", "Closed" }, def.types)
			assert.equal("stream", def.partition)
			assert.same({ budget = 5, own_events = true }, def.options)
			assert.equal(5, def.budget)
			assert.is_true(def.own_events)
			assert.is_function(def.on_error)
			assert.is_function(def.caught_up)
		end)

		it("normalizes setup and reset to arrays of SQL strings", function()
			assert.same({ "CREATE TABLE a(x int)", "CREATE INDEX ON a(x)" }, def.setup)
			assert.same({ "TRUNCATE a" }, def.reset)
		end)

		it("keeps source and a 16-hex-digit hash of it", function()
			local f = assert(io.open(FIX .. "alpha.lua"))
			local text = f:read("*a")
			f:close()
			assert.equal(text, def.source)
			assert.matches("^%x+$", def.hash)
			assert.equal(16, #def.hash)
			assert.equal(loader.hash(text), def.hash)
			assert.not_equal(loader.hash(text .. " "), def.hash)
		end)

		it("computes type_filter from the handlers, sorted", function()
			-- when has Deposited and Opened; Closed is in from.types only.
			assert.same({ "Deposited", "Opened" }, def.type_filter)
		end)

		it("runs handlers and init inside the sandbox with the allowed globals", function()
			local s = def.init()
			assert.same({ n = 0, at = true }, s)
			def.when.Deposited(s, { data = { amount = 5 } })
			assert.equal(5, s.n)
		end)
	end)

	describe("defaults", function()
		local def = assert(loader.load_file(FIX .. "beta.lua"))

		it("names the projection after its file", function()
			assert.equal("beta", def.name)
		end)

		it("fills version, init, setup, reset, options", function()
			assert.equal(1, def.version)
			assert.same({}, def.init())
			assert.same({}, def.setup)
			assert.same({}, def.reset)
			assert.same({}, def.options)
			assert.equal(loader.default_budget, def.budget)
			assert.is_false(def.own_events)
			assert.is_nil(def.partition)
			assert.is_nil(def.on_error)
		end)

		it("has no type_filter with a catch-all and no from.types", function()
			assert.is_nil(def.type_filter)
		end)
	end)

	describe("type_filter with a catch-all", function()
		it("is from.types", function()
			local def = assert(loader.load_source([[
				return { from = { category = "a", types = { "Y", "X" } },
					when = { ["*"] = function() end, X = function() end } }
			]], "inline.lua"))
			assert.same({ "X", "Y" }, def.type_filter)
		end)
	end)

	describe("rejects", function()
		it("a syntax error, with file:line", function()
			starts_with(BAD .. "syntax.lua:5: ", load_error("syntax"))
		end)

		it("a runtime error while loading, with file:line", function()
			local err = load_error("runtime_error")
			starts_with(BAD .. "runtime_error.lua:2: ", err)
			assert.matches("attempt to get length", err)
		end)

		it("a file not returning a table", function()
			assert.equal(BAD .. "not_table.lua:2: the file must return a projection table (got string)",
				load_error("not_table"))
		end)

		it("an unknown field (a typo must not be silent)", function()
			assert.equal(BAD .. "unknown_field.lua:3: unknown field 'whne'", load_error("unknown_field"))
		end)

		it("a missing when", function()
			local err = load_error("missing_when")
			starts_with(BAD .. "missing_when.lua:2: ", err)
			assert.matches("missing 'when'", err)
		end)

		it("a when value that is not a function, at its line", function()
			assert.equal(BAD .. "when_not_function.lua:5: handler for 'B' must be a function (got string)",
				load_error("when_not_function"))
		end)

		it("a missing from", function()
			local err = load_error("from_none")
			starts_with(BAD .. "from_none.lua:1: ", err)
			assert.matches("missing 'from'", err)
		end)

		it("a from with no kind", function()
			local err = load_error("from_empty")
			starts_with(BAD .. "from_empty.lua:3: ", err)
			assert.matches("exactly one of", err)
			assert.matches("got none", err)
		end)

		it("a from with two kinds", function()
			local err = load_error("from_two")
			starts_with(BAD .. "from_two.lua:3: ", err)
			assert.matches("got stream, category", err)
		end)

		it("from.types that are not strings, at the types line", function()
			local err = load_error("from_bad_types")
			starts_with(BAD .. "from_bad_types.lua:4: ", err)
			assert.matches("'from.types' must be", err)
		end)

		it("a category containing '-' (it could never match)", function()
			starts_with(BAD .. "from_category_dash.lua:2: 'from.category' must not contain '-'",
				load_error("from_category_dash"))
		end)

		it("a handler for a type outside from.types (it could never run)", function()
			assert.equal(BAD .. "dead_handler.lua:5: handler for 'Withdrawn' can never run: "
				.. "'Withdrawn' is not in from.types", load_error("dead_handler"))
		end)

		it("a version that is not a positive integer", function()
			assert.equal(BAD .. "bad_version.lua:3: 'version' must be an integer from 1 to 2147483647 (got 1.5)",
				load_error("bad_version"))
			assert.equal(BAD .. "big_version.lua:3: 'version' must be an integer from 1 to 2147483647 "
				.. "(got 3000000000)", load_error("big_version"))
			for _, v in ipairs({ "0", "-1", "'1'", "0/0", "math.huge", "-math.huge", "2^31", "2147483647.5" }) do
				local def, err = loader.load_source("return { version = " .. v
					.. ", from = { all = true }, when = { A = function() end } }", "v.lua")
				assert.is_nil(def)
				assert.matches("^v%.lua:1: 'version' must be an integer from 1 to 2147483647", err)
			end
			assert.equal(2147483647, assert(loader.load_source("return { version = 2147483647, "
				.. "from = { all = true }, when = { A = function() end } }", "v.lua")).version)
		end)

		it("a bad name", function()
			starts_with(BAD .. "bad_name.lua:3: 'name' must be", load_error("bad_name"))
		end)

		it("a name the host's own log lines use", function()
			for _, name in ipairs({ "host", "worker" }) do
				local def, err = loader.load_source("return { name = '" .. name .. "', when = {} }", "p.lua")
				assert.is_nil(def)
				assert.matches("'" .. name .. "' names the host's own log lines", err, 1, true)
			end
			local dir = os.tmpname()
			os.remove(dir)
			assert(require("lfs").mkdir(dir))
			local f = assert(io.open(dir .. "/host.lua", "w"))
			f:write("return { when = {} }")
			f:close()
			local def, err = loader.load_file(dir .. "/host.lua")
			os.remove(dir .. "/host.lua")
			require("lfs").rmdir(dir)
			assert.is_nil(def)
			assert.matches("'host' names the host's own log lines", err, 1, true)
		end)

		it("a partition other than \"stream\"", function()
			starts_with(BAD .. "bad_partition.lua:3: 'partition' must be \"stream\"",
				load_error("bad_partition"))
		end)

		it("a setup that is not SQL strings", function()
			starts_with(BAD .. "bad_setup.lua:3: 'setup' must be", load_error("bad_setup"))
		end)

		it("an init that fails, with its line", function()
			local err = load_error("init_error")
			starts_with(BAD .. "init_error.lua:4: ", err)
			assert.matches("arithmetic", err)
		end)

		it("an init that returns no table", function()
			assert.equal(BAD .. "init_not_table.lua:4: init must return a table (got number)",
				load_error("init_not_table"))
		end)
	end)

	describe("sandbox", function()
		it("denies os.execute", function()
			assert.equal(BAD .. "os_execute.lua:2: os.execute is not available in the projection sandbox",
				load_error("os_execute"))
			assert.is_nil(io.open("/tmp/projhost-sandbox-breach"))
		end)

		it("denies io", function()
			assert.equal(BAD .. "io_open.lua:2: unknown global 'io' (not available in the projection sandbox)",
				load_error("io_open"))
		end)

		it("denies require", function()
			assert.equal(BAD .. "require.lua:3: unknown global 'require' (not available in the projection sandbox)",
				load_error("require"))
		end)

		it("raises on reading an unknown global", function()
			assert.equal(BAD .. "unknown_global.lua:1: unknown global 'LIMIT'", load_error("unknown_global"))
		end)

		it("raises on assigning a global", function()
			assert.equal(BAD .. "global_assign.lua:2: assignment to undeclared global 'helper' (declare it local)",
				load_error("global_assign"))
		end)

		it("denies the other escape hatches", function()
			for _, name in ipairs({ "dofile", "loadfile", "load", "loadstring", "debug",
				"package", "module", "setfenv", "getfenv", "collectgarbage", "_G" }) do
				local def, err = loader.load_source("local x = " .. name .. "\nreturn {}", "s.lua")
				assert.is_nil(def)
				assert.equal("s.lua:1: unknown global '" .. name
					.. "' (not available in the projection sandbox)", err)
			end
		end)

		it("gives each file its own copies of string, table and math", function()
			local def = assert(loader.load_source([[
				string.upper = function() return "hacked" end
				table.insert = nil
				math.pi = 3
				return { from = { all = true }, when = { A = function() end } }
			]], "mutate.lua"))
			assert.truthy(def)
			assert.equal("ABC", string.upper("abc"))
			assert.is_function(table.insert)
			assert.is_true(math.pi > 3.14)
		end)

		it("allows only os.time, os.clock and os.date", function()
			local def, err = loader.load_source([[
				local t, c, d = os.time(), os.clock(), os.date("!%Y")
				assert(type(t) == "number" and type(c) == "number" and type(d) == "string")
				local x = os.getenv("HOME")
			]], "os.lua")
			assert.is_nil(def)
			assert.equal("os.lua:3: os.getenv is not available in the projection sandbox", err)
		end)

		it("provides json", function()
			local def = assert(loader.load_source([[
				local t = json.decode(json.encode({ a = 1 }))
				return { from = { all = true }, when = { A = function() end },
					options = { budget = t.a } }
			]], "json.lua"))
			assert.same({ budget = 1 }, def.options)
		end)

		it("routes print to loader.log_fn, with the file apart", function()
			local got = {}
			local saved = loader.log_fn
			loader.log_fn = function(level, msg, path) got[#got + 1] = { level, msg, path } end
			local def = loader.load_source([[
				print("hello", 42, nil)
				return { from = { all = true }, when = { A = function() end } }
			]], "print.lua")
			loader.log_fn = saved
			assert.truthy(def)
			assert.same({ { "info", "hello 42 nil", "print.lua" } }, got)
		end)

		it("keeps the sandbox for handlers at run time", function()
			local def = assert(loader.load_source([[
				return { from = { all = true }, when = {
					A = function() return io.open("/etc/passwd") end,
				} }
			]], "late.lua"))
			local ok, err = pcall(def.when.A, {}, {})
			assert.is_false(ok)
			assert.equal("late.lua:2: unknown global 'io' (not available in the projection sandbox)", err)
		end)
	end)

	describe("load_paths", function()
		it("loads a directory's *.lua files sorted by name, skipping _ and . files", function()
			local defs, errors = loader.load_paths({ FIX })
			assert.same({}, errors)
			local names = {}
			for i, d in ipairs(defs) do names[i] = d.name end
			-- _helper.lua, .hidden.lua (both invalid) and notes.txt are skipped,
			-- and the sub-folders are not entered.
			assert.same({ "alpha", "beta" }, names)
		end)

		it("skips *_spec.lua files in directories", function()
			local dir = tmpdir()
			write(dir .. "/x.lua", "return { from = { all = true }, when = { A = function() end } }")
			write(dir .. "/x_spec.lua", "describe('not a projection', function() end)")
			local defs, errors = loader.load_paths({ dir })
			os.execute("rm -rf '" .. dir .. "'")
			assert.same({}, errors)
			assert.equal(1, #defs)
			assert.equal("x", defs[1].name)
		end)

		it("takes files as given, and sorts the result by name", function()
			local defs, errors = loader.load_paths({ FIX .. "beta.lua", FIX .. "alpha.lua" })
			assert.same({}, errors)
			assert.equal("alpha", defs[1].name)
			assert.equal("beta", defs[2].name)
		end)

		it("loads the good files of a directory with a bad one", function()
			local defs, errors = loader.load_paths({ FIX .. "mixed" })
			assert.equal(2, #defs)
			assert.equal("one", defs[1].name)
			assert.equal("three", defs[2].name)
			assert.equal(1, #errors)
			starts_with(FIX .. "mixed/two.lua:4: ", errors[1])
		end)

		it("reports one error per bad file", function()
			local defs, errors = loader.load_paths({ BAD })
			assert.same({}, defs)
			local n = 0
			local p = io.popen("ls -1 " .. BAD .. " | grep -c '\\.lua$'")
			n = tonumber(p:read("*l"))
			p:close()
			assert.equal(n, #errors)
			for _, e in ipairs(errors) do
				assert.matches("^spec/fixtures/projections/bad/[%w_]+%.lua:%d+: ", e)
			end
		end)

		it("reports a duplicate name on the second file", function()
			local defs, errors = loader.load_paths({ FIX .. "dup" })
			assert.equal(1, #defs)
			assert.equal(FIX .. "dup/a.lua", defs[1].file)
			assert.same({ FIX .. "dup/b.lua:3: duplicate projection name 'same' (also defined in "
				.. FIX .. "dup/a.lua)" }, errors)
		end)

		it("reports a missing path and still loads the rest", function()
			local defs, errors = loader.load_paths({ "no/such/dir", FIX .. "beta.lua" })
			assert.same({ "no/such/dir: no such file or directory" }, errors)
			assert.equal(1, #defs)
			assert.equal("beta", defs[1].name)
		end)

		it("reports a missing file from load_file", function()
			local def, err = loader.load_file("no/such/file.lua")
			assert.is_nil(def)
			assert.equal("no/such/file.lua: no such file or directory", err)
		end)
	end)
end)

describe("loader: rebuild", function()
	local loader = require "projhost.loader"
	local function src(extra)
		return "return { from = { all = true }, when = { X = function() end }, " .. extra .. " }"
	end

	it("defaults to shadow without reset SQL and to in_place with it", function()
		assert.equal("shadow", assert(loader.load_source(src(""), "a.lua")).rebuild)
		assert.equal("in_place", assert(loader.load_source(src('reset = "TRUNCATE t",'), "b.lua")).rebuild)
	end)

	it("takes an explicit choice and rejects anything else with file:line", function()
		assert.equal("shadow", assert(loader.load_source(src('reset = "TRUNCATE t", rebuild = "shadow",'), "c.lua")).rebuild)
		local def, err = loader.load_source(src('rebuild = "later",'), "d.lua")
		assert.is_nil(def)
		assert.matches("^d%.lua:1: 'rebuild' must be \"shadow\" or \"in_place\"", err)
	end)
end)

describe("loader: definitions with metatables", function()
	local function load_error(name)
		local def, err = loader.load_file(BAD .. name .. ".lua")
		assert.is_nil(def)
		assert.is_string(err)
		return err
	end

	-- Each of these raises or loops in a metamethod; reading the definition
	-- must not invoke any of them (a crash or hang of the loader otherwise).
	it("rejects a projection table with a metatable, at the return", function()
		assert.equal(BAD .. "mt_top.lua:3: the projection table must not have a metatable",
			load_error("mt_top"))
	end)

	it("rejects from, when, from.types and options with a metatable, at their lines", function()
		assert.equal(BAD .. "mt_when.lua:3: 'when' must be a plain table (it has a metatable)", load_error("mt_when"))
		assert.equal(BAD .. "mt_from.lua:2: 'from' must be a plain table (it has a metatable)", load_error("mt_from"))
		assert.equal(BAD .. "mt_types.lua:3: 'from.types' must be a plain table (it has a metatable)",
			load_error("mt_types"))
		assert.equal(BAD .. "mt_options.lua:4: 'options' must be a plain table (it has a metatable)",
			load_error("mt_options"))
	end)

	it("rejects setup and reset arrays with a metatable", function()
		local def, err = loader.load_source([[return { from = { all = true }, when = { A = function() end },
			setup = setmetatable({ "SELECT 1" }, { __index = function() while true do end end }) }]], "s.lua")
		assert.is_nil(def)
		assert.equal("s.lua:2: 'setup' must be a plain table (it has a metatable)", err)
	end)

	it("names a key of any type without calling its metamethods", function()
		assert.equal(BAD .. "mt_key.lua:4: unknown field (a table key)", load_error("mt_key"))
		assert.equal(BAD .. "mt_when_key.lua:4: 'when' keys must be event type strings or \"*\" (got a table key)",
			load_error("mt_when_key"))
	end)

	it("keeps its own copies: a script changing its tables later changes nothing", function()
		local def = assert(loader.load_source([[
			local opts = { budget = 2 }
			local when = {}
			when.A = function() when.B = function() end; setmetatable(opts, { __index = function() while true do end end }) end
			return { from = { all = true }, when = when, options = opts }
		]], "c.lua"))
		def.when.A({}, {})
		assert.is_nil(def.when.B)
		assert.is_nil(getmetatable(def.options))
		assert.equal(2, def.options.budget)
	end)
end)

describe("loader: error objects at load", function()
	it("turns an error object whose __tostring raises into a message", function()
		local def, err = loader.load_source(
			[[error(setmetatable({}, { __tostring = function() error("no", 0) end }))]], "e.lua")
		assert.is_nil(def)
		assert.equal("e.lua: (error object is a table value; its __tostring failed: no)", err)
	end)

	it("turns nil, a coroutine and a huge string into messages", function()
		for src, want in pairs({
			["error(nil)"] = "^n%.lua: %(error object is a nil value%)$",
			["error(coroutine.create(print))"] = "unknown global 'coroutine'",
			["error(('x'):rep(1e6))"] = "^n%.lua:1: xxxx.* %.%.%. %(1000009 bytes in all%)$",
		}) do
			local def, err = loader.load_source(src, "n.lua")
			assert.is_nil(def)
			assert.matches(want, err)
		end
	end)

	it("stops an error object's __tostring that loops", function()
		local guard = require "projhost.guard"
		local saved = guard.TOSTRING_BUDGET
		guard.TOSTRING_BUDGET = 0.05
		local def, err = loader.load_source(
			[[error(setmetatable({}, { __tostring = function() while true do end end }))]], "l.lua")
		guard.TOSTRING_BUDGET = saved
		assert.is_nil(def)
		assert.equal("l.lua: (error object is a table value; its __tostring failed: overran its budget of 0.05s)", err)
	end)
end)

describe("loader: budget at load", function()
	local saved
	before_each(function()
		saved = loader.default_budget
		loader.default_budget = 0.1
	end)
	after_each(function() loader.default_budget = saved end)

	it("defaults to PROJHOST_BUDGET or 30 s", function()
		local env = tonumber(os.getenv("PROJHOST_BUDGET"))
		assert.equal(env or 30, saved)
	end)

	it("reports a file that loops at its top level", function()
		local def, err = loader.load_source("while true do end", "loop.lua")
		assert.is_nil(def)
		assert.equal("loop.lua: loading overran its budget of 0.1s", err)
	end)

	it("is not fooled by a top level that swallows the overrun with pcall", function()
		local def, err = loader.load_source([[
			while true do pcall(function() while true do end end) end
		]], "loop.lua")
		assert.is_nil(def)
		assert.equal("loop.lua: loading overran its budget of 0.1s", err)
	end)

	it("reports an init that loops, with options.budget as its budget", function()
		local def, err = loader.load_source([[return { from = { all = true }, when = { A = function() end },
			options = { budget = 0.05 },
			init = function() while true do end end }]], "init.lua")
		assert.is_nil(def)
		assert.equal("init.lua:3: init overran its budget of 0.05s", err)
	end)

	it("reports an init that runs out of memory", function()
		local def, err = loader.load_source([[return { from = { all = true }, when = { A = function() end },
			init = function() error("not enough memory", 0) end }]], "mem.lua")
		assert.is_nil(def)
		assert.equal("mem.lua:2: init failed: not enough memory", err)
	end)

	it("leaves the looping file out and loads the others", function()
		local dir = tmpdir()
		write(dir .. "/a.lua", "while true do end")
		write(dir .. "/b.lua", "return { from = { all = true }, when = { A = function() end } }")
		write(dir .. "/c.lua", [[
			local t = {} while true do t[#t + 1] = {} if #t > 1e5 then t = {} end end]])
		local defs, errors = loader.load_paths({ dir })
		os.execute("rm -rf '" .. dir .. "'")
		assert.equal(1, #defs)
		assert.equal("b", defs[1].name)
		assert.same({ dir .. "/a.lua: loading overran its budget of 0.1s",
			dir .. "/c.lua: loading overran its budget of 0.1s" }, errors)
	end)
end)

describe("loader: options", function()
	local function opts(text)
		return loader.load_source("return { from = { all = true }, when = { A = function() end },\n"
			.. "options = " .. text .. " }", "o.lua")
	end

	it("accepts budget and own_events", function()
		local def = assert(opts("{ budget = 0, own_events = false }"))
		assert.same({ budget = 0, own_events = false }, def.options)
		assert.equal(0, def.budget)
		assert.is_false(def.own_events)
		assert.equal(86400, assert(opts("{ budget = 86400 }")).budget)
		assert.equal(0.5, assert(opts("{ budget = 0.5 }")).budget)
	end)

	it("rejects an unknown option with its line", function()
		assert.equal(BAD .. "bad_option.lua:4: unknown option 'batch_sise' (known: budget, own_events)",
			select(2, loader.load_file(BAD .. "bad_option.lua")))
		local def, err = opts("{ [1] = true }")
		assert.is_nil(def)
		assert.equal("o.lua:2: unknown option (a number key) (known: budget, own_events)", err)
	end)

	it("rejects a budget that is not a finite number of seconds from 0 to 86400", function()
		assert.equal(BAD .. "bad_budget.lua:4: 'options.budget' must be a number of seconds from 0 (no limit) "
			.. "to 86400 (got inf)", select(2, loader.load_file(BAD .. "bad_budget.lua")))
		for _, v in ipairs({ "0/0", "-math.huge", "-1", "86401", "'5'", "true" }) do
			local def, err = opts("{ budget = " .. v .. " }")
			assert.is_nil(def, v)
			assert.matches("^o%.lua:2: 'options%.budget' must be a number of seconds from 0 %(no limit%) to 86400", err)
		end
	end)

	it("rejects an own_events that is not a boolean", function()
		assert.equal(BAD .. "bad_own_events.lua:4: 'options.own_events' must be true or false (got string)",
			select(2, loader.load_file(BAD .. "bad_own_events.lua")))
	end)
end)
