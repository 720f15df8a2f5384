/*
 * lua_worker.c - core.serve(fd, handler): the worker's loop.
 *
 * Reads a frame from the master, calls handler(payload) through the one
 * pcall wrapper, writes the returned string back as a frame. A nil return
 * (the "quit" verb) or EOF ends the loop. A Lua error in the handler is a
 * bug in projhost's own worker code (projection errors are caught in Lua),
 * so it is logged and the worker exits: the master respawns it.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

#include <lua.h>
#include <lauxlib.h>

#include "frame.h"
#include "log.h"
#include "lua_core.h"

int ph_l_serve(lua_State *L)
{
	int fd = (int)luaL_checkinteger(L, 1);

	luaL_checktype(L, 2, LUA_TFUNCTION);
	/* Die with the master: if it is SIGKILLed our transaction must end
	 * too, or a batch could outlive the process that owns its job. */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	/* Ctrl-C reaches the whole process group; the master decides how we
	 * stop (finish the batch, then quit). */
	signal(SIGINT, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	for (;;) {
		char *msg = NULL;
		size_t len = 0;
		int rc = ph_frame_read_fd(fd, &msg, &len);

		if (rc == 0)
			break;
		if (rc < 0) {
			ph_log(PH_ERROR, "worker", "reading from the master: %s", strerror(errno));
			lua_pushinteger(L, 1);
			return 1;
		}
		lua_pushvalue(L, 2);
		lua_pushlstring(L, msg, len);
		free(msg);
		if (ph_lua_pcall(L, 1, 1) != 0) {
			ph_log(PH_ERROR, "worker", "internal error: %s", lua_tostring(L, -1));
			lua_pushinteger(L, 1);
			return 1;
		}
		if (lua_isnil(L, -1)) {
			lua_pop(L, 1);
			break;
		}
		{
			size_t n;
			const char *out = luaL_checklstring(L, -1, &n);

			if (ph_frame_write_fd(fd, out, n) != 0) {
				ph_log(PH_ERROR, "worker", "writing to the master: %s", strerror(errno));
				lua_pushinteger(L, 1);
				return 1;
			}
		}
		lua_pop(L, 1);
	}
	lua_pushinteger(L, 0);
	return 1;
}
