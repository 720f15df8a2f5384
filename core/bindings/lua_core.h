/*
 * lua_core.h - the Lua module projhost.core: bindings over the C subsystems.
 */
#ifndef PH_LUA_CORE_H
#define PH_LUA_CORE_H

#include <lua.h>

/** luaopen_projhost_core() - open the module (also usable as core.so). */
int luaopen_projhost_core(lua_State *L);

/** ph_l_connect() - core.connect(dsn) -> conn | nil, msg, code */
int ph_l_connect(lua_State *L);

/**
 * ph_l_text_array() - core.text_array(list) -> the PostgreSQL text[]
 * literal of @list (strings; false is NULL): every element quoted, \ and "
 * escaped. In C: a chunk's 1,024 partitions and their JSON states, with a
 * Lua pattern per element (or over all of them), were a tenth of the
 * worker's time.
 */
int ph_l_text_array(lua_State *L);

/** ph_l_pg_open() - register the connection metatable. */
void ph_l_pg_open(lua_State *L);

/* lua_proc.c: processes and files (see there) */
int ph_l_spawn(lua_State *L);
int ph_l_wait(lua_State *L);
int ph_l_exec(lua_State *L);
int ph_l_exepath(lua_State *L);
int ph_l_environ(lua_State *L);
int ph_l_tmpdir(lua_State *L);
int ph_l_chmod(lua_State *L);
int ph_l_chown(lua_State *L);
int ph_l_geteuid(lua_State *L);

/** ph_l_run_master() - core.run_master(opts) -> exit code (lua_master.c). */
int ph_l_run_master(lua_State *L);

/**
 * ph_l_serve() - core.serve(fd, handler[, beat_fd[, memory_mb]]): the worker's
 * frame loop (lua_worker.c). handler(msg) returns the reply (nil: stop) and
 * optionally true to stop after sending it. memory_mb > 0 caps the process's
 * data size (RLIMIT_DATA); 0 or none: no cap.
 */
int ph_l_serve(lua_State *L);

/** ph_l_beat() - core.beat([position[, kind]]): stamp the heartbeat page (see beat.h). */
int ph_l_beat(lua_State *L);
/** ph_l_beat_backend() - core.beat_backend(pid): the worker's backend (see beat.h). */
int ph_l_beat_backend(lua_State *L);

/**
 * ph_lua_pcall() - the one way C calls into Lua: pcall with a traceback.
 * @L: state with the function and its @nargs arguments on top
 * @nargs: number of arguments
 * @nres: number of results
 *
 * Return: 0, or the lua_pcall error code with the message (plus traceback)
 * left on the stack.
 */
int ph_lua_pcall(lua_State *L, int nargs, int nres);

#endif
