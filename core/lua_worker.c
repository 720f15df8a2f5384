#include <lua.h>
#include <lauxlib.h>
#include "lua_core.h"
int ph_l_serve(lua_State *L) { return luaL_error(L, "not yet"); }
