/*
 * lua_core.c - projhost.core: small utilities and the module table.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/types.h>
#include <sys/wait.h>

#include <lua.h>
#include <lauxlib.h>

#include "fnv.h"
#include "log.h"
#include "lua_core.h"
#include "master.h"
#include "proto.h"
#include "version.h"

static int traceback(lua_State *L)
{
	const char *msg = lua_tostring(L, 1);

	if (!msg) {
		if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
			msg = lua_tostring(L, -1);
		else
			msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
	}
	lua_getglobal(L, "debug");
	lua_getfield(L, -1, "traceback");
	lua_pushstring(L, msg);
	lua_pushinteger(L, 2);
	lua_call(L, 2, 1);
	return 1;
}

int ph_lua_pcall(lua_State *L, int nargs, int nres)
{
	int base = lua_gettop(L) - nargs;
	int rc;

	lua_pushcfunction(L, traceback);
	lua_insert(L, base);
	rc = lua_pcall(L, nargs, nres, base);
	lua_remove(L, base);
	return rc;
}

/* core.monotime() -> seconds from an arbitrary start, monotonic */
static int ph_l_monotime(lua_State *L)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	lua_pushnumber(L, ts.tv_sec + ts.tv_nsec / 1e9);
	return 1;
}

/* core.sleep(seconds) */
static int ph_l_sleep(lua_State *L)
{
	double s = luaL_checknumber(L, 1);
	struct timespec ts = { .tv_sec = (time_t)s, .tv_nsec = (long)((s - (time_t)s) * 1e9) };

	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
	return 0;
}

/* core.kill(pid, signo) -> true | nil, msg, code */
static int ph_l_kill(lua_State *L)
{
	pid_t pid = (pid_t)luaL_checkinteger(L, 1);
	int sig = (int)luaL_optinteger(L, 2, SIGTERM);

	if (kill(pid, sig) == 0) {
		lua_pushboolean(L, 1);
		return 1;
	}
	lua_pushnil(L);
	lua_pushstring(L, strerror(errno));
	lua_pushstring(L, errno == ESRCH ? "ESRCH" : errno == EPERM ? "EPERM" : "EINVAL");
	return 3;
}

/* core.hash(s) -> 16 hex digits (FNV-1a 64): identifies a script version in
 * checkpoints and logs; not a security boundary. */
static int ph_l_hash(lua_State *L)
{
	size_t len;
	const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
	uint64_t h = ph_fnv1a(PH_FNV_OFFSET, s, len);
	char out[17];

	for (int i = 15; i >= 0; i--, h >>= 4)
		out[i] = "0123456789abcdef"[h & 15];
	out[16] = '\0';
	lua_pushstring(L, out);
	return 1;
}

/* A record's arguments: level, who, msg [, fields] at index 1..4. fields =
 * { position = int, stream = string, version = int }, each optional, read
 * raw (a metatable of the caller's runs nothing here); a value of another
 * kind is a programmer error and raises. */
struct rec {
	enum ph_level level;
	const char *who, *msg;
	size_t who_len, msg_len;
	struct ph_log_fields f;
};

static long long int_field(lua_State *L, int t, const char *key, unsigned bit, unsigned *has)
{
	lua_Number x;

	lua_pushstring(L, key);
	lua_rawget(L, t);
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return 0;
	}
	x = lua_tonumber(L, -1);
	/* -2^63 <= x < 2^63, whole: NaN fails every comparison */
	if (lua_type(L, -1) != LUA_TNUMBER || !(x >= -9223372036854775808.0 && x < 9223372036854775808.0)
	    || x != (lua_Number)(long long)x)
		luaL_error(L, "core.log: fields.%s must be an integer (got %s)", key, luaL_typename(L, -1));
	lua_pop(L, 1);
	*has |= bit;
	return (long long)x;
}

static void check_rec(lua_State *L, struct rec *r)
{
	static const char *const levels[] = { "debug", "info", "warn", "error", NULL };

	r->level = (enum ph_level)luaL_checkoption(L, 1, "info", levels);
	r->who = luaL_optlstring(L, 2, "host", &r->who_len);
	r->msg = luaL_checklstring(L, 3, &r->msg_len);
	memset(&r->f, 0, sizeof(r->f));
	if (lua_isnoneornil(L, 4))
		return;
	luaL_checktype(L, 4, LUA_TTABLE);
	r->f.position = int_field(L, 4, "position", PH_LOG_POSITION, &r->f.has);
	r->f.version = int_field(L, 4, "version", PH_LOG_VERSION, &r->f.has);
	lua_pushstring(L, "stream");
	lua_rawget(L, 4);
	if (lua_type(L, -1) == LUA_TSTRING)
		r->f.stream = lua_tolstring(L, -1, &r->f.stream_len);
	else if (!lua_isnil(L, -1))
		luaL_error(L, "core.log: fields.stream must be a string (got %s)", luaL_typename(L, -1));
	/* the string stays referenced by the table at index 4 */
	lua_pop(L, 1);
}

/* core.log(level, who, msg [, fields]): level is "debug", "info", "warn" or
 * "error"; who a projection, or "host"/"worker" (nil: "host"); fields the
 * event's position, stream and version (see check_rec). One formatter for
 * C and Lua, so every line of the host looks the same; who, msg and the
 * stream may hold any byte (NULs too): log.c escapes them. */
static int ph_l_log(lua_State *L)
{
	struct rec r;

	check_rec(L, &r);
	ph_log_rec(r.level, r.who, r.who_len, &r.f, r.msg, r.msg_len);
	return 0;
}

static const char *const formats[] = { "text", "json", NULL };

/* core.log_line(level, who, msg [, fields [, format]]) -> the line core.log
 * would write for this record (newline included), in format ("text" or
 * "json"; default the process's). Nothing is written: specs read it. */
static int ph_l_log_line(lua_State *L)
{
	char line[PH_LOG_JSON_LINE];
	struct timespec ts;
	struct rec r;
	enum ph_log_format fmt;
	size_t n;

	check_rec(L, &r);
	fmt = lua_isnoneornil(L, 5) ? ph_log_get_format() : (enum ph_log_format)luaL_checkoption(L, 5, NULL, formats);
	clock_gettime(CLOCK_REALTIME, &ts);
	n = ph_log_render(line, sizeof(line), fmt, &ts, r.level, r.who, r.who_len, &r.f, r.msg, r.msg_len);
	lua_pushlstring(L, line, n);
	return 1;
}

/* core.log_format([name]) -> the format of this process's lines; with
 * name ("text" or "json"), the format from now on (PROJHOST_LOG_FORMAT,
 * read by projhost.config, which has checked it: anything else is a
 * programmer error). */
static int ph_l_log_format(lua_State *L)
{
	if (!lua_isnoneornil(L, 1))
		ph_log_set_format((enum ph_log_format)luaL_checkoption(L, 1, NULL, formats));
	lua_pushstring(L, formats[ph_log_get_format()]);
	return 1;
}

/* core.log_debug(on): write debug lines too (PROJHOST_DEBUG, read by
 * projhost.config) */
static int ph_l_log_debug(lua_State *L)
{
	ph_log_set_debug(lua_toboolean(L, 1));
	return 0;
}

/* core.escape(s [, max]) -> s with control characters escaped by the log's
 * own rule (ph_escape), for anything shown to people on one line (tables,
 * error lines); with max, at most max bytes, never cutting an escape or a
 * UTF-8 character. */
static int ph_l_escape(lua_State *L)
{
	size_t len, off = 0, used;
	const char *s = luaL_checklstring(L, 1, &len);
	size_t left = (size_t)-1;
	luaL_Buffer b;

	if (!lua_isnoneornil(L, 2)) {
		/* checked as a number: casting inf or NaN to an integer is undefined */
		lua_Number max = luaL_checknumber(L, 2);

		luaL_argcheck(L, max >= 0, 2, "must not be negative");
		if (max < (lua_Number)len * 8)
			left = (size_t)max;
	}
	luaL_buffinit(L, &b);
	while (off < len) {
		char *p = luaL_prepbuffer(&b);
		size_t room = left < LUAL_BUFFERSIZE ? left : LUAL_BUFFERSIZE;
		size_t n = ph_escape(p, room, s + off, len - off, &used);

		luaL_addsize(&b, n);
		left -= n;
		off += used;
		/* a whole buffer always takes the next unit (at most 8 bytes):
		 * nothing taken means max is reached */
		if (used == 0)
			break;
	}
	luaL_pushresult(&b);
	return 1;
}

static const luaL_Reg core_funcs[] = {
	{ "log", ph_l_log },
	{ "log_debug", ph_l_log_debug },
	{ "log_line", ph_l_log_line },
	{ "log_format", ph_l_log_format },
	{ "escape", ph_l_escape },
	{ "connect", ph_l_connect },
	{ "text_array", ph_l_text_array },
	{ "monotime", ph_l_monotime },
	{ "sleep", ph_l_sleep },
	{ "kill", ph_l_kill },
	{ "spawn", ph_l_spawn },
	{ "wait", ph_l_wait },
	{ "exec", ph_l_exec },
	{ "exepath", ph_l_exepath },
	{ "environ", ph_l_environ },
	{ "tmpdir", ph_l_tmpdir },
	{ "chmod", ph_l_chmod },
	{ "chown", ph_l_chown },
	{ "geteuid", ph_l_geteuid },
	{ "hash", ph_l_hash },
	{ "run_master", ph_l_run_master },
	{ "serve", ph_l_serve },
	{ "beat", ph_l_beat },
	{ "beat_backend", ph_l_beat_backend },
	{ NULL, NULL }
};

int luaopen_projhost_core(lua_State *L)
{
	ph_l_pg_open(L);
	lua_newtable(L);
	luaL_register(L, NULL, core_funcs);
	lua_pushstring(L, PH_VERSION);
	lua_setfield(L, -2, "version");
	lua_pushinteger(L, PH_MAX_WORKERS);
	lua_setfield(L, -2, "max_workers");
	lua_pushinteger(L, PH_WORKER_PIPE_FD);
	lua_setfield(L, -2, "WORKER_PIPE_FD");
	lua_pushinteger(L, PH_WORKER_BEAT_FD);
	lua_setfield(L, -2, "WORKER_BEAT_FD");
	return 1;
}
