/*
 * lua_master.c - core.run_master(opts): hands `projhost run` to the C master.
 */
#include <limits.h>
#include <stdlib.h>

#include <lua.h>
#include <lauxlib.h>

#include "lua_core.h"
#include "master.h"

/* core.run_master{ dsn=, bin=, paths={...}, workers=, once=, poll_interval=, http=, stall_after= } -> exit code */
int ph_l_run_master(lua_State *L)
{
	struct ph_master_cfg cfg = { 0 };
	const char **paths;
	int n, rc;

	luaL_checktype(L, 1, LUA_TTABLE);
	lua_getfield(L, 1, "dsn");
	cfg.dsn = luaL_checkstring(L, -1);
	lua_getfield(L, 1, "bin");
	cfg.bin = luaL_checkstring(L, -1);
	lua_getfield(L, 1, "workers");
	{
		/* any number: the master clamps it to what it can run */
		lua_Number w = luaL_optnumber(L, -1, 1);

		cfg.workers = !(w >= 1) ? 1 : w >= INT_MAX ? INT_MAX : (int)w;
	}
	lua_getfield(L, 1, "once");
	cfg.once = lua_toboolean(L, -1);
	lua_getfield(L, 1, "poll_interval");
	cfg.poll_interval = luaL_optnumber(L, -1, 5.0);
	lua_getfield(L, 1, "http");
	cfg.http = luaL_optstring(L, -1, NULL);	/* anchored by the options table */
	lua_getfield(L, 1, "stall_after");
	cfg.stall_after = luaL_optnumber(L, -1, 60.0);
	lua_getfield(L, 1, "paths");
	luaL_checktype(L, -1, LUA_TTABLE);
	n = (int)lua_objlen(L, -1);
	paths = calloc((size_t)n + 1, sizeof(*paths));
	if (!paths)
		return luaL_error(L, "out of memory");
	for (int i = 0; i < n; i++) {
		lua_rawgeti(L, -1, i + 1);
		paths[i] = lua_tostring(L, -1);	/* anchored by the paths table */
		lua_pop(L, 1);
		if (!paths[i]) {
			free(paths);
			return luaL_error(L, "paths[%d] is not a string", i + 1);
		}
	}
	cfg.paths = paths;
	cfg.npaths = n;
	rc = ph_master_run(&cfg);
	free(paths);
	lua_pushinteger(L, rc);
	return 1;
}
