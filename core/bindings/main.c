/*
 * main.c - the projhost binary: a LuaJIT state with projhost.core preloaded
 * that hands the command line to projhost.cli (lua/projhost/cli/).
 *
 * The command line, the embedded cluster and the CLI commands are Lua; the
 * `run` command calls back into C (core.run_master) for the libuv master,
 * and workers are this same binary started as `projhost __worker`.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "lua_core.h"

#ifndef PH_LUADIR
#define PH_LUADIR "/usr/local/share/projhost/lua"
#endif

static int file_exists(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0;
}

/* The Lua library sits next to the binary in a checkout (./lua), and in
 * ../share/projhost/lua of an installed one (`make install PREFIX=...`,
 * wherever the tree was moved to), else under PH_LUADIR (the PREFIX it
 * was built for); PROJHOST_LUADIR overrides them all. */
static void find_luadir(char *out, size_t len)
{
	const char *env = getenv("PROJHOST_LUADIR");
	char exe[PATH_MAX - 32];
	ssize_t n;

	if (env && *env) {
		snprintf(out, len, "%s", env);
		return;
	}
	n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (n > 0) {
		char *slash, probe[PATH_MAX + 64];

		exe[n] = '\0';
		slash = strrchr(exe, '/');
		if (slash)
			*slash = '\0';
		snprintf(probe, sizeof(probe), "%s/lua/projhost/cli/init.lua", exe);
		if (file_exists(probe)) {
			snprintf(out, len, "%s/lua", exe);
			return;
		}
		snprintf(probe, sizeof(probe), "%s/../share/projhost/lua/projhost/cli/init.lua", exe);
		if (file_exists(probe)) {
			snprintf(out, len, "%s/../share/projhost/lua", exe);
			return;
		}
	}
	snprintf(out, len, "%s", PH_LUADIR);
}

int main(int argc, char **argv)
{
	char luadir[PATH_MAX];
	lua_State *L = luaL_newstate();
	int rc;

	if (!L) {
		fprintf(stderr, "projhost: cannot create a Lua state (out of memory)\n");
		return 1;
	}
	luaL_openlibs(L);
	find_luadir(luadir, sizeof(luadir));

	/* package.path: our library first, then LuaJIT's defaults (busted,
	 * cjson and friends from Debian live there). */
	lua_getglobal(L, "package");
	lua_getfield(L, -1, "path");
	lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", luadir, luadir, lua_tostring(L, -1));
	lua_setfield(L, -3, "path");
	lua_pop(L, 1);
	lua_getfield(L, -1, "preload");
	lua_pushcfunction(L, luaopen_projhost_core);
	lua_setfield(L, -2, "projhost.core");
	lua_pop(L, 2);

	/* arg table as the standalone interpreter builds it: arg[0] = program */
	lua_createtable(L, argc, 1);
	for (int i = 0; i < argc; i++) {
		lua_pushstring(L, argv[i]);
		lua_rawseti(L, -2, i);
	}
	lua_setglobal(L, "arg");

	lua_getglobal(L, "require");
	lua_pushstring(L, "projhost.cli");
	if (ph_lua_pcall(L, 1, 1) != 0) {
		fprintf(stderr, "projhost: cannot load the Lua library from %s: %s\n",
			luadir, lua_tostring(L, -1));
		return 1;
	}
	lua_getfield(L, -1, "main");
	lua_getglobal(L, "arg");
	if (ph_lua_pcall(L, 1, 1) != 0) {
		fprintf(stderr, "projhost: internal error: %s\n", lua_tostring(L, -1));
		return 1;
	}
	rc = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : 0;
	fflush(stdout);
	lua_close(L);
	return rc;
}
