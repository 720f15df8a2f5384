rockspec_format = "3.0"
package = "projhost"
version = "scm-1"
source = {
	url = "git+file:///projhost",
}
description = {
	summary = "Projection host for PostgreSQL event stores: C core, Lua projections",
	detailed = [[
projhost reads events from a PostgreSQL event store in gap-free order and runs
projections written in Lua, committing read-model writes, emitted events, state
and checkpoint in one transaction. This rock provides the Lua library
(require "projhost") and the C module projhost.core; the `projhost` binary is
built with `make`.]],
	license = "MIT",
}
-- LuaJIT: its C API is Lua 5.1's, which projhost.core is written against,
-- and the library relies on its FFI and bit modules.
dependencies = {
	"lua == 5.1",
	"lua-cjson",
	"luafilesystem",
}
external_dependencies = {
	LIBPQ = { header = "postgresql/libpq-fe.h", library = "pq" },
	LIBUV = { header = "uv.h", library = "uv" },
	MICROHTTPD = { header = "microhttpd.h", library = "microhttpd" },
}
build = {
	type = "builtin",
	modules = {
		["projhost.core"] = {
			sources = {
				"core/log.c", "core/beat.c", "core/pg.c", "core/stmt.c", "core/frame.c", "core/proto.c", "core/queue.c", "core/pipeline.c", "core/registry.c", "core/schedule.c",
				"core/proc.c", "core/wakecheck.c", "core/http.c", "core/metrics.c", "core/surface.c", "core/subscribe.c", "core/master.c",
				"core/bindings/lua_core.c", "core/bindings/lua_pg.c", "core/bindings/lua_master.c",
				"core/bindings/lua_worker.c", "core/bindings/lua_proc.c",
			},
			defines = { "_GNU_SOURCE" },
			incdirs = { "core", "$(LIBPQ_INCDIR)/postgresql", "$(LIBPQ_INCDIR)", "$(LIBUV_INCDIR)",
				"$(MICROHTTPD_INCDIR)" },
			libdirs = { "$(LIBPQ_LIBDIR)", "$(LIBUV_LIBDIR)", "$(MICROHTTPD_LIBDIR)" },
			libraries = { "pq", "uv", "microhttpd" },
		},
		["projhost"] = "lua/projhost/init.lua",
		["projhost.cli"] = "lua/projhost/cli/init.lua",
		["projhost.cli.util"] = "lua/projhost/cli/util.lua",
		["projhost.cli.run"] = "lua/projhost/cli/run.lua",
		["projhost.cli.append"] = "lua/projhost/cli/append.lua",
		["projhost.cli.status"] = "lua/projhost/cli/status.lua",
		["projhost.cli.wait"] = "lua/projhost/cli/wait.lua",
		["projhost.cli.control"] = "lua/projhost/cli/control.lua",
		["projhost.cli.db"] = "lua/projhost/cli/db.lua",
		["projhost.cli.test"] = "lua/projhost/cli/test.lua",
		["projhost.config"] = "lua/projhost/config.lua",
		["projhost.embedded"] = "lua/projhost/embedded.lua",
		["projhost.guard"] = "lua/projhost/guard.lua",
		["projhost.loader"] = "lua/projhost/loader.lua",
		["projhost.proc"] = "lua/projhost/proc.lua",
		["projhost.projection"] = "lua/projhost/projection.lua",
		["projhost.json"] = "lua/projhost/json.lua",
		["projhost.reads"] = "lua/projhost/reads.lua",
		["projhost.run"] = "lua/projhost/run.lua",
		["projhost.schema"] = "lua/projhost/schema.lua",
		["projhost.test_output"] = "lua/projhost/test_output.lua",
		["projhost.testing"] = "lua/projhost/testing.lua",
		["projhost.units"] = "lua/projhost/units.lua",
		["projhost.wire"] = "lua/projhost/wire.lua",
		["projhost.worker"] = "lua/projhost/worker/init.lua",
		["projhost.worker.catchup"] = "lua/projhost/worker/catchup.lua",
		["projhost.worker.ctx"] = "lua/projhost/worker/ctx.lua",
		["projhost.worker.discovery"] = "lua/projhost/worker/discovery.lua",
		["projhost.worker.events"] = "lua/projhost/worker/events.lua",
		["projhost.worker.failure"] = "lua/projhost/worker/failure.lua",
		["projhost.worker.lifecycle"] = "lua/projhost/worker/lifecycle.lua",
		["projhost.worker.page"] = "lua/projhost/worker/page.lua",
		["projhost.worker.parked"] = "lua/projhost/worker/parked.lua",
		["projhost.worker.parts"] = "lua/projhost/worker/parts.lua",
		["projhost.worker.protocol"] = "lua/projhost/worker/protocol.lua",
		["projhost.worker.session"] = "lua/projhost/worker/session.lua",
		["projhost.worker.state"] = "lua/projhost/worker/state.lua",
		["projhost.worker.timers"] = "lua/projhost/worker/timers.lua",
		["projhost.worker.transact"] = "lua/projhost/worker/transact.lua",
	},
}
test_dependencies = {
	"busted",
}
test = {
	type = "busted",
}
