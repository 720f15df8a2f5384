#include <lua.h>
#include <lauxlib.h>
#include "lua_core.h"
int ph_l_run_master(lua_State *L) { return luaL_error(L, "not yet"); }
