/*
 * lua_proc.c - processes and files for Lua, in luv's style: failures
 * return nil, message, errno name ("ENOENT"); only misuse raises.
 *
 *   core.spawn(path, args, env, files) -> pid     argv is { path, args... };
 *       env: array of "NAME=value"; files: in, out, err (paths; err == out
 *       shares one file description, like 2>&1), cwd
 *   core.wait(pid, timeout_s) -> code, maxrss_kb | nil while it runs
 *   core.exec(path, argv) -> nil, msg, ENAME  (argv[1] is argv[0]; only
 *       returns when it failed)
 *   core.exepath() -> path
 *   core.environ() -> { { name, value }, ... } in environment order
 *   core.tmpdir(prefix) -> path  a new "<prefix>XXXXXX", mode 0755
 *   core.chmod(path, mode) -> true
 *   core.chown(path, user) -> true
 *   core.geteuid() -> uid
 */
#include <errno.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include <lua.h>
#include <lauxlib.h>

#include "lua_core.h"
#include "proc.h"

extern char **environ;

static int fail(lua_State *L, int err)
{
	lua_pushnil(L);
	lua_pushstring(L, strerror(err));
	lua_pushstring(L, ph_proc_errname(err));
	return 3;
}

/* A NULL-terminated array of the strings of table @idx, @first in front
 * if not NULL, in a userdata the caller pops. Only strings: the table
 * keeps them alive (a number converted on the stack would not be). */
static char **strings(lua_State *L, int idx, const char *first)
{
	size_t n = lua_objlen(L, idx), k = 0;
	char **v = lua_newuserdata(L, (n + 2) * sizeof(*v));

	if (first)
		v[k++] = (char *)first;
	for (size_t i = 1; i <= n; i++) {
		lua_rawgeti(L, idx, (int)i);
		if (lua_type(L, -1) != LUA_TSTRING)
			luaL_error(L, "element %d is a %s, not a string", (int)i, luaL_typename(L, -1));
		v[k++] = (char *)lua_tostring(L, -1);
		lua_pop(L, 1);
	}
	v[k] = NULL;
	return v;
}

static const char *opt_field(lua_State *L, int idx, const char *name)
{
	const char *s;

	lua_getfield(L, idx, name);
	s = lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
	lua_pop(L, 1);	/* the files table keeps it alive */
	return s;
}

int ph_l_spawn(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	struct ph_spawn_files f = { 0 };
	char **argv, **envp;
	pid_t pid;
	int rc;

	luaL_checktype(L, 2, LUA_TTABLE);
	luaL_checktype(L, 3, LUA_TTABLE);
	if (!lua_isnoneornil(L, 4)) {
		luaL_checktype(L, 4, LUA_TTABLE);
		f.in = opt_field(L, 4, "in");
		f.out = opt_field(L, 4, "out");
		f.err = opt_field(L, 4, "err");
		f.cwd = opt_field(L, 4, "cwd");
		f.err_is_out = f.err && f.out && strcmp(f.err, f.out) == 0;
	}
	argv = strings(L, 2, path);
	envp = strings(L, 3, NULL);
	rc = ph_proc_spawn(path, argv, envp, &f, &pid);
	lua_pop(L, 2);
	if (rc)
		return fail(L, rc);
	lua_pushinteger(L, pid);
	return 1;
}

int ph_l_wait(lua_State *L)
{
	pid_t pid = (pid_t)luaL_checkinteger(L, 1);
	double timeout = luaL_optnumber(L, 2, 0);
	int code;
	long rss;
	int r = ph_proc_wait(pid, timeout, &code, &rss);

	if (r < 0)
		return fail(L, -r);
	if (r == 0) {
		lua_pushnil(L);
		return 1;
	}
	lua_pushinteger(L, code);
	lua_pushinteger(L, rss);
	return 2;
}

int ph_l_exec(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	char **argv;

	luaL_checktype(L, 2, LUA_TTABLE);
	argv = strings(L, 2, NULL);
	fflush(NULL);
	execv(path, argv);
	return fail(L, errno);
}

int ph_l_exepath(lua_State *L)
{
	char buf[PATH_MAX];
	int rc = ph_proc_exepath(buf, sizeof(buf));

	if (rc)
		return fail(L, rc);
	lua_pushstring(L, buf);
	return 1;
}

int ph_l_environ(lua_State *L)
{
	int n = 0;

	lua_newtable(L);
	for (char **e = environ; e && *e; e++) {
		const char *eq = strchr(*e, '=');

		if (!eq)
			continue;
		lua_createtable(L, 2, 0);
		lua_pushlstring(L, *e, (size_t)(eq - *e));
		lua_rawseti(L, -2, 1);
		lua_pushstring(L, eq + 1);
		lua_rawseti(L, -2, 2);
		lua_rawseti(L, -2, ++n);
	}
	return 1;
}

int ph_l_tmpdir(lua_State *L)
{
	size_t len;
	const char *prefix = luaL_checklstring(L, 1, &len);
	char *t = malloc(len + 7);

	if (!t)
		return fail(L, ENOMEM);
	memcpy(t, prefix, len);
	memcpy(t + len, "XXXXXX", 7);
	/* 0755: `nobody` (who runs test clusters when we are root) enters it */
	if (!mkdtemp(t) || chmod(t, 0755) != 0) {
		int err = errno;

		free(t);
		return fail(L, err);
	}
	lua_pushstring(L, t);
	free(t);
	return 1;
}

int ph_l_chmod(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	mode_t mode = (mode_t)luaL_checkinteger(L, 2);

	if (chmod(path, mode) != 0)
		return fail(L, errno);
	lua_pushboolean(L, 1);
	return 1;
}

int ph_l_chown(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	const char *user = luaL_checkstring(L, 2);
	struct passwd *pw;

	errno = 0;
	pw = getpwnam(user);
	if (!pw) {
		lua_pushnil(L);
		lua_pushfstring(L, "no user named %s", user);
		lua_pushstring(L, errno ? ph_proc_errname(errno) : "ENOENT");
		return 3;
	}
	if (chown(path, pw->pw_uid, pw->pw_gid) != 0)
		return fail(L, errno);
	lua_pushboolean(L, 1);
	return 1;
}

int ph_l_geteuid(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)geteuid());
	return 1;
}
