/*
 * lua_worker.c - core.serve(fd, handler[, beat_fd[, memory_mb]]): the worker's loop.
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
#include <sys/resource.h>

#include <lua.h>
#include <lauxlib.h>

#include "beat.h"
#include "frame.h"
#include "log.h"
#include "lua_core.h"

#if defined(__SANITIZE_ADDRESS__)
#define PH_ASAN 1
#else
#define PH_ASAN 0
#endif

/* The heartbeat page the master watches (fd 4), when there is one. */
static struct ph_beat *beat;

/* core.beat(position[, kind]) before projection code runs (kind: "handler"
 * when omitted, or "on_error", "caught_up", "init", "sql", "load"; see
 * beat.h), core.beat() after it. Called per event: no string work for the
 * common case. */
int ph_l_beat(lua_State *L)
{
	int kind = PH_BEAT_HANDLER;
	int64_t pos;

	if (lua_isnoneornil(L, 1)) {
		if (beat)
			ph_beat_clear(beat);
		return 0;
	}
	pos = (int64_t)luaL_checknumber(L, 1);
	if (!lua_isnoneornil(L, 2)) {
		kind = ph_beat_kind_of(luaL_checkstring(L, 2));
		if (kind < 0)
			return luaL_argerror(L, 2, "unknown kind of code");
	}
	if (beat)
		ph_beat_set(beat, pos, kind);
	return 0;
}

/* core.beat_backend(pid): the worker's backend, for the next worker to end
 * a statement this one may leave running (see beat.h). */
int ph_l_beat_backend(lua_State *L)
{
	lua_Integer pid = luaL_checkinteger(L, 1);

	if (beat && pid >= 0 && pid <= INT32_MAX)
		ph_beat_set_backend(beat, (int32_t)pid);
	return 0;
}

/* A projection that allocates without bound must hit a wall in its own
 * process (Lua raises "not enough memory", the worker is rebuilt), not
 * push the machine into the OOM killer. LuaJIT allocates with mmap, which
 * RLIMIT_DATA covers. ASan reserves terabytes of shadow memory, so
 * sanitizer builds go without. */
static void limit_memory(long mb)
{
	struct rlimit rl;

	if (PH_ASAN || mb <= 0)
		return;
	rl.rlim_cur = rl.rlim_max = (rlim_t)mb << 20;
	if (setrlimit(RLIMIT_DATA, &rl) != 0)
		ph_log(PH_WARN, "worker", "cannot limit memory to %ld MB: %s", mb, strerror(errno));
}

int ph_l_serve(lua_State *L)
{
	int fd = (int)luaL_checkinteger(L, 1);
	int beat_fd = (int)luaL_optinteger(L, 3, -1);
	long mb = (long)luaL_optinteger(L, 4, 0);

	luaL_checktype(L, 2, LUA_TFUNCTION);
	/* Die with the master: if it is SIGKILLed our transaction must end
	 * too, or a batch could outlive the process that owns its job. */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	/* Ctrl-C reaches the whole process group; the master decides how we
	 * stop (finish the batch, then quit). */
	signal(SIGINT, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	if (beat_fd >= 0)
		beat = ph_beat_attach(beat_fd);
	limit_memory(mb);
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
		if (ph_lua_pcall(L, 1, 2) != 0) {
			ph_log(PH_ERROR, "worker", "internal error: %s", lua_tostring(L, -1));
			lua_pushinteger(L, 1);
			return 1;
		}
		/* handler returns reply[, exit_after] */
		if (lua_isnil(L, -2)) {
			lua_pop(L, 2);
			break;
		}
		{
			size_t n;
			const char *out = luaL_checklstring(L, -2, &n);
			int exit_after = lua_toboolean(L, -1);

			if (ph_frame_write_fd(fd, out, n) != 0) {
				ph_log(PH_ERROR, "worker", "writing to the master: %s", strerror(errno));
				lua_pushinteger(L, 1);
				return 1;
			}
			lua_pop(L, 2);
			if (exit_after)
				break;
		}
	}
	lua_pushinteger(L, 0);
	return 1;
}
