/*
 * lua_pg.c - Lua binding of a libpq connection (projhost.core.connect).
 *
 * Runtime failures return nil, msg, sqlstate (luv style); only misuse (a
 * table where a parameter should be, a closed connection) raises.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <poll.h>

#include <lua.h>
#include <lauxlib.h>

#include "pg.h"
#include "pipeline.h"
#include "stmt.h"
#include "lua_core.h"

#define PH_CONN_MT "projhost.conn"
#define MAX_PARAMS 256

/* The pipeline's record (what was sent, routing, prepared statements,
 * which tag each statement has) is core/pipeline.c's; this file turns its
 * results into Lua values and keeps the tags' values (see hold_tag). */
/* How rows become events (conn:event_fields): which columns are copied
 * into the event table under which name (and as numbers or text), which
 * stay in the page until a handler reads them, and which two say where a
 * page ends. The worker hands its map over once per connection; this file
 * knows no column of the events table. */
#define PH_FIELDS_MAX 16
#define PH_NAME_MAX 32
struct ph_l_field {
	char col[PH_NAME_MAX], field[PH_NAME_MAX];
	int number;
};
struct ph_l_fields {
	int neager, nlazy;
	struct ph_l_field eager[PH_FIELDS_MAX], lazy[PH_FIELDS_MAX];
	char last_tx[PH_NAME_MAX], last_pos[PH_NAME_MAX];
};

typedef struct {
	PGconn *conn;
	struct ph_pipe pipe;	/* pipelined texts run as prepared statements */
	int ntags;		/* tags held in the environment table (see hold_tag) */
	struct ph_l_fields fields;
} ph_l_conn;

typedef struct ph_l_page ph_l_page_t;

/* Prepared statements per connection at most (see stmt.h). */
#define PH_MAX_PREPARED 256

static ph_l_conn *check_c(lua_State *L)
{
	ph_l_conn *c = luaL_checkudata(L, 1, PH_CONN_MT);

	if (!c->conn)
		luaL_error(L, "connection is closed");
	return c;
}

static PGconn *check_conn(lua_State *L)
{
	return check_c(L)->conn;
}

/* nil, msg (with its DETAIL), code for @res or @conn; @res is left alone */
static int push_error_of(lua_State *L, PGconn *conn, const PGresult *res)
{
	char buf[1024];
	const char *detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;

	lua_pushnil(L);
	ph_pg_errmsg(conn, res, buf, sizeof(buf));
	if (detail)
		lua_pushfstring(L, "%s (%s)", buf, detail);
	else
		lua_pushstring(L, buf);
	lua_pushstring(L, ph_pg_errcode(conn, res));
	return 3;
}

/* push_error_of, then clear @res */
static int push_error(lua_State *L, PGconn *conn, PGresult *res)
{
	push_error_of(L, conn, res);
	if (res)
		PQclear(res);
	return 3;
}

int ph_l_text_array(lua_State *L)
{
	luaL_Buffer b;
	int n, i;

	luaL_checktype(L, 1, LUA_TTABLE);
	n = (int)lua_objlen(L, 1);
	luaL_buffinit(L, &b);
	luaL_addchar(&b, '{');
	for (i = 1; i <= n; i++) {
		const char *s, *from;
		size_t len, j;

		if (i > 1)
			luaL_addchar(&b, ',');
		lua_rawgeti(L, 1, i);
		if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
			lua_pop(L, 1);
			luaL_addstring(&b, "NULL");
			continue;
		}
		if (lua_type(L, -1) != LUA_TSTRING)
			return luaL_error(L, "core.text_array: element %d is a %s, not a string or false", i,
					  luaL_typename(L, -1));
		/* the list still holds the string: it lives on once popped (the
		 * buffer wants the stack as it found it) */
		s = lua_tolstring(L, -1, &len);
		lua_pop(L, 1);
		luaL_addchar(&b, '"');
		from = s;
		for (j = 0; j < len; j++) {
			if (s[j] != '\\' && s[j] != '"')
				continue;
			luaL_addlstring(&b, from, (size_t)(s + j - from));
			luaL_addchar(&b, '\\');
			from = s + j;
		}
		luaL_addlstring(&b, from, (size_t)(s + len - from));
		luaL_addchar(&b, '"');
	}
	luaL_addchar(&b, '}');
	luaL_pushresult(&b);
	return 1;
}

int ph_l_connect(lua_State *L)
{
	const char *dsn = luaL_optstring(L, 1, "");
	char *err = NULL;
	PGconn *conn = ph_pg_connect(dsn, &err);
	ph_l_conn *c;

	if (!conn) {
		lua_pushnil(L);
		lua_pushstring(L, err ? err : "cannot connect");
		lua_pushstring(L, "08001");
		free(err);
		return 3;
	}
	c = lua_newuserdata(L, sizeof(*c));
	memset(c, 0, sizeof(*c));
	c->conn = conn;
	/* the tags of the statements queued (see hold_tag) */
	lua_newtable(L);
	lua_setfenv(L, -2);
	/* no statement cache (out of memory): nothing is prepared */
	ph_pipe_init(&c->pipe, conn, ph_stmts_new(PH_MAX_PREPARED));
	luaL_getmetatable(L, PH_CONN_MT);
	lua_setmetatable(L, -2);
	return 1;
}

/* Convert Lua arguments [first, top] to text parameters. Numbers that are
 * integral go out without an exponent so bigint columns accept them. */
static int collect_params(lua_State *L, int first, const char **vals, char bufs[][32])
{
	int n = lua_gettop(L) - first + 1;

	if (n > MAX_PARAMS)
		luaL_error(L, "too many parameters (%d, max %d)", n, MAX_PARAMS);
	for (int i = 0; i < n; i++) {
		int idx = first + i;

		switch (lua_type(L, idx)) {
		case LUA_TNIL:
			vals[i] = NULL;
			break;
		case LUA_TBOOLEAN:
			vals[i] = lua_toboolean(L, idx) ? "true" : "false";
			break;
		case LUA_TNUMBER: {
			lua_Number d = lua_tonumber(L, idx);

			/* the range first: casting a number outside it is undefined */
			if (d < 9.2e18 && d > -9.2e18 && d == (lua_Number)(long long)d)
				snprintf(bufs[i], 32, "%lld", (long long)d);
			else
				snprintf(bufs[i], 32, "%.17g", d);
			vals[i] = bufs[i];
			break;
		}
		case LUA_TSTRING:
			vals[i] = lua_tostring(L, idx);
			break;
		default:
			luaL_error(L, "parameter $%d: cannot send a %s (encode tables as JSON first)",
				   i + 1, luaL_typename(L, idx));
		}
	}
	return n > 0 ? n : 0;
}

static void push_events(lua_State *L, PGresult *res, const struct ph_l_fields *fields);
static ph_l_page_t *push_page(lua_State *L, PGresult *res, const struct ph_l_fields *fields);
static void push_rows(lua_State *L, PGresult *res);

/*
 * Pipeline mode: per-event statements of a batch are queued without waiting
 * for each round trip; errors come back at the next sync, so the caller
 * must be told which statement failed. Each statement may carry a tag, any
 * Lua value but nil (conn:send_as, conn:query_as, ...: the worker tags a
 * statement with the event that caused it): the tag of the failed one comes
 * back with the error, conn:pending() lists those still waiting. A
 * statement sent without a tag (conn:send, ...) comes back as its number
 * since the last sync instead, as it always did.
 *
 * core/pipeline.c records each statement's tag as an int (see hold_tag):
 * false and whole numbers in [0, INT_TAG_MAX) - our own statements and the
 * index of the event that made one, nearly every statement - are coded in
 * it; any other value lives in the connection's environment table (its
 * uservalue), slots 1..ntags in the order they were sent. Storing every
 * tag in the table cost ~5-10% more per queued statement than the worker's
 * old mirror of statement numbers (20,000 statements a sync, measured
 * here); coded ones cost nothing. Every sync, and a change of mode, empties
 * the table: a tag is never kept alive past its statement.
 */
#define NO_TAG 0
#define FALSE_TAG (-1)
#define INT_TAG_MAX (INT_MAX - 1)

/* Hold the value at stack slot @slot (0: none) as the tag of the statement
 * about to be sent. Return: its tag for ph_pipe_send: NO_TAG; k + 1 for a
 * whole number k in [0, INT_TAG_MAX); FALSE_TAG; or -(s + 1) for slot s of
 * the environment table. The methods' stack slot 1 is the connection (so
 * are all the functions below). */
static int hold_tag(lua_State *L, ph_l_conn *c, int slot)
{
	if (!slot)
		return NO_TAG;
	if (lua_type(L, slot) == LUA_TNUMBER) {
		lua_Number d = lua_tonumber(L, slot);

		/* the range first: casting a number outside it is undefined */
		if (d >= 0 && d < INT_TAG_MAX && d == (lua_Number)(int)d)
			return (int)d + 1;
	} else if (lua_type(L, slot) == LUA_TBOOLEAN && !lua_toboolean(L, slot)) {
		return FALSE_TAG;
	}
	lua_getfenv(L, 1);
	lua_pushvalue(L, slot);
	lua_rawseti(L, -2, c->ntags + 1);
	lua_pop(L, 1);
	return -(++c->ntags + 1);
}

/* The statement @tag was held for was not sent after all. */
static void drop_tag(lua_State *L, ph_l_conn *c, int tag)
{
	if (tag > FALSE_TAG)
		return;
	/* the table's: the last slot */
	lua_getfenv(L, 1);
	lua_pushnil(L);
	lua_rawseti(L, -2, -tag - 1);
	lua_pop(L, 1);
	c->ntags--;
}

/* Push what names statement @q (its tag @tag): the value it was sent with,
 * its number when it had none, nil when it is no statement (the connection
 * broke after the last result). Before the sync is ended (end_sync). */
static void push_tag(lua_State *L, ph_l_conn *c, int q, int tag)
{
	if (tag > NO_TAG) {
		lua_pushinteger(L, tag - 1);
	} else if (tag == FALSE_TAG) {
		lua_pushboolean(L, 0);
	} else if (tag < FALSE_TAG) {
		lua_getfenv(L, 1);
		lua_rawgeti(L, -1, -tag - 1);
		lua_remove(L, -2);
	} else if (q > 0 && q <= c->pipe.pending) {
		lua_pushinteger(L, q);
	} else {
		lua_pushnil(L);
	}
}

/* The pipeline was synced (or its mode changed): what was queued is gone,
 * and so are the tags' values. */
static void end_sync(lua_State *L, ph_l_conn *c)
{
	ph_pipe_reset(&c->pipe);
	if (!c->ntags)
		return;
	lua_getfenv(L, 1);
	for (int i = 1; i <= c->ntags; i++) {
		lua_pushnil(L);
		lua_rawseti(L, -2, i);
	}
	lua_pop(L, 1);
	c->ntags = 0;
}

/* nil, msg, code, tag of the statement @seen charged its error to (and
 * @seen's error is cleared). */
static int push_failure(lua_State *L, ph_l_conn *c, struct ph_pipe_seen *seen)
{
	push_error(L, c->conn, seen->err);
	seen->err = NULL;
	push_tag(L, c, seen->err_index, seen->err_tag);
	return 4;
}

/* Where one drain or take stands in the results of the pipeline. */
struct cursor {
	lua_State *L;		/* push results into the table at slot @results */
	int results;
	struct ph_pipe_seen seen;
};

/* Take result @r of the next statement or Parse (routed by
 * ph_pipe_account) into Lua (with cur->L) or keep it as the last. Takes @r
 * over. Return: 1 when it was a statement's result, 0 when a Parse's. */
static int take_result(ph_l_conn *c, struct cursor *cur, PGresult *r)
{
	int kind, kept, q = ph_pipe_account(&c->pipe, &cur->seen, r, &kind, &kept);
	ExecStatusType st = PQresultStatus(r);
	lua_State *L = cur->L;

	if (!q)
		return 0;
	if (L) {
		if (st == PGRES_TUPLES_OK && (kind == PH_PIPE_EVENTS || kind == PH_PIPE_PAGE)) {
			/* the page owns r now */
			if (kind == PH_PIPE_EVENTS)
				push_events(L, r, &c->fields);
			else
				push_page(L, r, &c->fields);
		} else if (st == PGRES_TUPLES_OK && kind == PH_PIPE_ROWS) {
			push_rows(L, r);
		} else if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
			const char *t = PQcmdTuples(r);

			lua_pushnumber(L, t && *t ? strtod(t, NULL) : PQntuples(r));
		} else {
			lua_pushboolean(L, 0);	/* failed or skipped */
		}
		lua_rawseti(L, cur->results, q);
		if (!kept && !(st == PGRES_TUPLES_OK && (kind == PH_PIPE_EVENTS || kind == PH_PIPE_PAGE)))
			PQclear(r);
		return 1;
	}
	if (kept)
		return 1;
	if (cur->seen.last)
		PQclear(cur->seen.last);
	cur->seen.last = r;
	return 1;
}

/* Sync and read every pending result. Without @L the last result is kept
 * in @seen->last; with @L each statement's result goes into the table at
 * stack slot @results (see conn:sync(true)). The first error goes to
 * @seen->err with its statement's number and tag - also one conn:take met
 * earlier. Results conn:take returned are not read again. The caller ends
 * the sync (end_sync) once it pushed the tag. Return: 0 ok, -1 error. */
static int drain_results(ph_l_conn *c, lua_State *L, int results, struct ph_pipe_seen *seen)
{
	struct cursor cur = { L, results, { NULL, c->pipe.err, c->pipe.err_index, c->pipe.err_tag } };
	int nulls = 0, rc = 0;

	c->pipe.err = NULL;
	c->pipe.err_index = c->pipe.err_tag = 0;
	if (!PQpipelineSync(c->conn)) {
		rc = -1;
		goto out;
	}
	for (;;) {
		PGresult *r = PQgetResult(c->conn);

		if (!r) {
			/* one NULL ends each statement's results; two in a row
			 * mean nothing more is coming (the connection broke) */
			if (++nulls > 1 || PQstatus(c->conn) == CONNECTION_BAD) {
				ph_pipe_lost(&c->pipe, &cur.seen);
				rc = -1;
				goto out;
			}
			continue;
		}
		nulls = 0;
		if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
			PQclear(r);
			break;
		}
		take_result(c, &cur, r);
	}
	rc = cur.seen.err ? -1 : 0;
out:
	*seen = cur.seen;
	return rc;
}

/* Run the statement whose text is at stack slot 2, or 3 after a tag at
 * slot 2 (@tagged: conn:query_as), with parameters after it. In pipeline
 * mode it joins the queue and the pipeline is synced, so earlier
 * statements' errors surface here. Return: its result (the caller's to
 * clear; its status is COMMAND_OK or TUPLES_OK), or NULL after pushing
 * nil, msg, code[, tag] - *@nret values. The tag is the failed statement's
 * (push_tag); when the statement itself failed outside pipeline mode, or
 * could not be sent, its own tag, and none without one. */
static PGresult *run(lua_State *L, ph_l_conn *c, int tagged, int *nret)
{
	int base = tagged ? 3 : 2, tag;
	const char *sql = luaL_checkstring(L, base);
	const char *vals[MAX_PARAMS];
	static char bufs[MAX_PARAMS][32];
	int n = collect_params(L, base + 1, vals, bufs);
	struct ph_pipe_seen seen;
	PGresult *res = NULL;

	if (tagged && lua_isnil(L, 2))
		luaL_argerror(L, 2, "a tag must not be nil");
	/* Without parameters, the simple query protocol: a setup or reset
	 * string may hold several statements. */
	if (PQpipelineStatus(c->conn) == PQ_PIPELINE_OFF) {
		ExecStatusType st;

		res = n == 0 ? PQexec(c->conn, sql) : PQexecParams(c->conn, sql, n, NULL, vals, NULL, NULL, 0);
		st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
		if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
			return res;
		goto own;
	}
	tag = hold_tag(L, c, tagged ? 2 : 0);
	if (ph_pipe_send(&c->pipe, PH_PIPE_ROWS, tag, sql, n, vals, 0) <= 0) {
		drop_tag(L, c, tag);
		goto own;
	}
	if (drain_results(c, NULL, 0, &seen) != 0) {
		if (seen.last)
			PQclear(seen.last);
		*nret = push_failure(L, c, &seen);
		end_sync(L, c);
		return NULL;
	}
	end_sync(L, c);
	return seen.last;
own:
	*nret = push_error(L, c->conn, res);
	if (tagged) {
		lua_pushvalue(L, 2);
		(*nret)++;
	}
	return NULL;
}

/* conn:exec(sql, ...) -> affected row count | nil, msg, code[, tag] */
static int ph_l_conn_exec(lua_State *L)
{
	ph_l_conn *c = check_c(L);
	int nret;
	PGresult *res = run(L, c, 0, &nret);
	const char *t;

	if (!res)
		return nret;
	t = PQcmdTuples(res);
	lua_pushnumber(L, t && *t ? strtod(t, NULL) : (PQresultStatus(res) == PGRES_TUPLES_OK ? PQntuples(res) : 0));
	PQclear(res);
	return 1;
}

/* Push the rows of @res as an array of tables keyed by column name. */
static void push_rows(lua_State *L, PGresult *res)
{
	int nr = PQntuples(res), nf = PQnfields(res);

	lua_createtable(L, nr, 0);
	for (int r = 0; r < nr; r++) {
		lua_createtable(L, 0, nf);
		for (int f = 0; f < nf; f++) {
			if (PQgetisnull(res, r, f))
				continue;
			lua_pushlstring(L, PQgetvalue(res, r, f), PQgetlength(res, r, f));
			lua_setfield(L, -2, PQfname(res, f));
		}
		lua_rawseti(L, -2, r + 1);
	}
}

static int query(lua_State *L, int tagged)
{
	ph_l_conn *c = check_c(L);
	int nret;
	PGresult *res = run(L, c, tagged, &nret);

	if (!res)
		return nret;
	push_rows(L, res);
	lua_pushinteger(L, PQntuples(res));
	PQclear(res);
	return 2;
}

/* conn:query(sql, ...) -> rows, count | nil, msg, code[, tag] */
static int ph_l_conn_query(lua_State *L)
{
	return query(L, 0);
}

/* conn:query_as(tag, sql, ...): conn:query whose statement carries @tag -
 * given back when it is the one that failed (also outside pipeline mode) */
static int ph_l_conn_query_as(lua_State *L)
{
	return query(L, 1);
}

/*
 * conn:take() -> the result of the first statement not yet read since the
 * last sync (rows, events, a page or a count, by how it was sent), before
 * the sync | nil, msg, code, tag. For a result wanted early: the worker
 * takes the page it read ahead and makes its events while the server still
 * runs the statements queued after it. The statement must have been
 * followed by conn:flush(), or the server may still hold its tail. An error
 * is reported again by the next sync.
 */
static int ph_l_conn_take(lua_State *L)
{
	ph_l_conn *c = check_c(L);
	struct cursor cur = { L, 0, { NULL, NULL, 0, 0 } };
	int q0 = c->pipe.q, lost = 0;

	if (PQpipelineStatus(c->conn) == PQ_PIPELINE_OFF || c->pipe.q >= c->pipe.pending)
		return luaL_error(L, "conn:take: no statement is waiting for its result");
	lua_createtable(L, 1, 0);
	cur.results = lua_gettop(L);
	while (c->pipe.q == q0) {
		PGresult *r = PQgetResult(c->conn);

		if (!r) {
			/* the NULL after a Parse's result; or a broken connection */
			if (PQstatus(c->conn) == CONNECTION_BAD) {
				ph_pipe_lost(&c->pipe, &cur.seen);
				lost = 1;
				break;
			}
			continue;
		}
		take_result(c, &cur, r);
	}
	/* the NULL that ends the statement's results */
	if (!lost && PQgetResult(c->conn) != NULL)
		return luaL_error(L, "conn:take: more than one result for one statement");
	if (!cur.seen.err && !lost) {
		lua_rawgeti(L, cur.results, c->pipe.q);
		return 1;
	}
	/* kept for the sync, reported now too; the first error stays first */
	if (c->pipe.err) {
		if (cur.seen.err)
			PQclear(cur.seen.err);
	} else if (cur.seen.err) {
		c->pipe.err = cur.seen.err;
		c->pipe.err_index = cur.seen.err_index;
		c->pipe.err_tag = cur.seen.err_tag;
	}
	if (!c->pipe.err) {
		/* lost with no error met: the sync says so again */
		push_error_of(L, c->conn, NULL);
		push_tag(L, c, cur.seen.err_index, cur.seen.err_tag);
		return 4;
	}
	push_error_of(L, c->conn, c->pipe.err);
	push_tag(L, c, c->pipe.err_index, c->pipe.err_tag);
	return 4;
}

/* conn:pending() -> the tags of the statements whose results were not read
 * yet, in the order they were sent (a statement sent without a tag: its
 * number); empty after a sync. The worker charges the statements the
 * server still runs to the first event that queued one. */
static int ph_l_conn_pending(lua_State *L)
{
	ph_l_conn *c = check_c(L);
	struct ph_pipe_walk w = { 0 };
	int q, tag, i = 0;

	lua_createtable(L, c->pipe.pending - c->pipe.q, 0);
	while ((q = ph_pipe_pending_next(&c->pipe, &w, &tag)) > 0) {
		push_tag(L, c, q, tag);
		lua_rawseti(L, -2, ++i);
	}
	return 1;
}

/* conn:pipeline(on) -> true | nil, msg, code. Leaving needs a synced pipeline. */
static int ph_l_conn_pipeline(lua_State *L)
{
	ph_l_conn *c = check_c(L);
	int on = lua_toboolean(L, 2);
	int was_on = PQpipelineStatus(c->conn) != PQ_PIPELINE_OFF;
	int ok = on ? PQenterPipelineMode(c->conn) : PQexitPipelineMode(c->conn);

	if (!ok)
		return push_error(L, c->conn, NULL);
	/* what is queued stays queued while the mode does not change */
	if (on != was_on) {
		end_sync(L, c);
		if (c->pipe.err)
			PQclear(c->pipe.err);
		c->pipe.err = NULL;
	}
	lua_pushboolean(L, 1);
	return 1;
}

/* Queue a statement of @kind: its text at stack slot 2, or 3 after its tag
 * (@tagged), parameters after it. It returns the statement's number since
 * the last sync: results come back by position (conn:sync(true)'s
 * results[n]; the worker finds the page it read ahead there), errors by
 * tag. */
static int send_kind(lua_State *L, int kind, int tagged)
{
	ph_l_conn *c = check_c(L);
	int base = tagged ? 3 : 2;
	const char *sql = luaL_checkstring(L, base);
	const char *vals[MAX_PARAMS];
	static char bufs[MAX_PARAMS][32];
	int n = collect_params(L, base + 1, vals, bufs), q, tag;

	if (tagged && lua_isnil(L, 2))
		luaL_argerror(L, 2, "a tag must not be nil");
	if (PQpipelineStatus(c->conn) == PQ_PIPELINE_OFF)
		return luaL_error(L, "conn:send needs pipeline mode (conn:pipeline(true))");
	tag = hold_tag(L, c, tagged ? 2 : 0);
	q = ph_pipe_send(&c->pipe, kind, tag, sql, n, vals, 1);
	if (q <= 0)
		drop_tag(L, c, tag);
	if (q < 0)
		return luaL_error(L, "out of memory");
	if (q == 0)
		return push_error(L, c->conn, NULL);
	lua_pushinteger(L, q);
	return 1;
}

/* conn:send(sql, ...) -> statements pending | nil, msg, code (pipeline mode) */
static int ph_l_conn_send(lua_State *L)
{
	return send_kind(L, PH_PIPE_COUNT, 0);
}

/* conn:send_query(sql, ...): like send; conn:sync(true) returns its rows */
static int ph_l_conn_send_query(lua_State *L)
{
	return send_kind(L, PH_PIPE_ROWS, 0);
}

/* conn:send_events(sql, ...): like send; conn:sync(true) returns event tables */
static int ph_l_conn_send_events(lua_State *L)
{
	return send_kind(L, PH_PIPE_EVENTS, 0);
}

/* conn:send_page(sql, ...): like send_events, but conn:sync(true) returns
 * the page itself; page:events() makes the event tables when wanted. */
static int ph_l_conn_send_page(lua_State *L)
{
	return send_kind(L, PH_PIPE_PAGE, 0);
}

/* conn:send_as(tag, sql, ...), send_query_as, send_events_as,
 * send_page_as: the same, the statement tagged @tag (any value but nil) */
static int ph_l_conn_send_as(lua_State *L)
{
	return send_kind(L, PH_PIPE_COUNT, 1);
}

static int ph_l_conn_send_query_as(lua_State *L)
{
	return send_kind(L, PH_PIPE_ROWS, 1);
}

static int ph_l_conn_send_events_as(lua_State *L)
{
	return send_kind(L, PH_PIPE_EVENTS, 1);
}

static int ph_l_conn_send_page_as(lua_State *L)
{
	return send_kind(L, PH_PIPE_PAGE, 1);
}

/* conn:flush() -> true | nil, msg, code: send what the pipeline holds now,
 * so the server starts on it while we go on (libpq sends a pipeline's
 * statements only once 64 KB have piled up, or at the sync). */
static int ph_l_conn_flush(lua_State *L)
{
	ph_l_conn *c = check_c(L);

	/* and ask the server to send back what it has by then (conn:take) */
	if ((PQpipelineStatus(c->conn) != PQ_PIPELINE_OFF && !PQsendFlushRequest(c->conn)) || PQflush(c->conn) != 0)
		return push_error(L, c->conn, NULL);
	lua_pushboolean(L, 1);
	return 1;
}

/* conn:consume() -> true | nil, msg, code: take in what the server has sent
 * so far (libpq buffers it; nothing is parsed yet). A pipeline's big
 * result - the next page of events - otherwise fills the socket and stops
 * the server mid-way until the sync. */
static int ph_l_conn_consume(lua_State *L)
{
	ph_l_conn *c = check_c(L);

	if (!PQconsumeInput(c->conn))
		return push_error(L, c->conn, NULL);
	lua_pushboolean(L, 1);
	return 1;
}

/*
 * conn:sync() -> true | nil, msg, code, tag of the failed statement
 * conn:sync(true): sync and return every statement's result: results[i] is
 * the affected count, the rows or the events (by how it was sent), or false
 * for a failed or skipped one. -> true, results | nil, msg, code, tag, results
 */
static int ph_l_conn_sync(lua_State *L)
{
	ph_l_conn *c = check_c(L);
	struct ph_pipe_seen seen;
	int n, results = 0;

	if (lua_toboolean(L, 2)) {
		lua_createtable(L, c->pipe.pending, 0);
		results = lua_gettop(L);
	}
	if (drain_results(c, results ? L : NULL, results, &seen) == 0) {
		if (seen.last)
			PQclear(seen.last);
		end_sync(L, c);
		lua_pushboolean(L, 1);
		if (!results)
			return 1;
		lua_insert(L, results);
		return 2;
	}
	if (seen.last)
		PQclear(seen.last);
	n = push_failure(L, c, &seen);
	end_sync(L, c);
	if (results) {
		lua_pushvalue(L, results);
		n++;
	}
	return n;
}

/*
 * conn:events(sql, ...) -> array of event tables | nil, msg, code
 *
 * The worker's read path: one Lua table per row, built here with the field
 * names handlers use, so a batch of thousands of events costs one table per
 * event and no second pass in Lua. Columns are renamed as the connection's
 * map says (conn:event_fields; the worker's is projhost.reads.EVENT_FIELDS);
 * any other column keeps its name, as text.
 *
 * The map's lazy columns are not copied into the table at all: most
 * handlers read one of them at most, and making five strings per event was
 * most of the cost of a page (measured: a counting projection spent half
 * its time here). Each event carries _page (the page's result, kept alive
 * by its events) and _row instead, and page:text(row, field) fetches a lazy
 * field when the worker's event metatable asks.
 */
#define PH_PAGE_MT "projhost.page"

struct ph_l_page {
	PGresult *res;
	struct ph_l_fields fields;	/* the connection's map when it was read */
	int col[PH_FIELDS_MAX];		/* column of each lazy field, -1 if absent */
};

static int ph_l_page_gc(lua_State *L)
{
	ph_l_page_t *p = luaL_checkudata(L, 1, PH_PAGE_MT);

	if (p->res)
		PQclear(p->res);
	p->res = NULL;
	return 0;
}

/* page:text(row, field) -> the column's text, or nil (NULL or no such column) */
static int ph_l_page_text(lua_State *L)
{
	ph_l_page_t *p = luaL_checkudata(L, 1, PH_PAGE_MT);
	int row = (int)luaL_checkinteger(L, 2) - 1;
	const char *field = luaL_checkstring(L, 3);

	for (int k = 0; k < p->fields.nlazy; k++) {
		int f = p->col[k];

		if (strcmp(field, p->fields.lazy[k].field) != 0)
			continue;
		if (f < 0 || !p->res || row < 0 || row >= PQntuples(p->res) || PQgetisnull(p->res, row, f))
			break;
		lua_pushlstring(L, PQgetvalue(p->res, row, f), PQgetlength(p->res, row, f));
		return 1;
	}
	lua_pushnil(L);
	return 1;
}

/* Push a page owning @res, its rows read by @fields. */
static ph_l_page_t *push_page(lua_State *L, PGresult *res, const struct ph_l_fields *fields)
{
	ph_l_page_t *p = lua_newuserdata(L, sizeof(*p));

	p->res = res;
	p->fields = *fields;
	for (int k = 0; k < fields->nlazy; k++)
		p->col[k] = PQfnumber(res, fields->lazy[k].col);
	luaL_getmetatable(L, PH_PAGE_MT);
	lua_setmetatable(L, -2);
	return p;
}

/* Push the rows of the page at stack slot @page as event tables (see above). */
static void push_page_events(lua_State *L, int page)
{
	ph_l_page_t *p = lua_touserdata(L, page);
	PGresult *res = p->res;
	int nr = res ? PQntuples(res) : 0, nf = res ? PQnfields(res) : 0, keys, number[64], eager[64];

	if (nf > 64)
		nf = 64;	/* our queries have 10 */
	/* field names once, as stack slots */
	keys = lua_gettop(L) + 1;
	for (int f = 0; f < nf; f++) {
		const char *name = PQfname(res, f);

		number[f] = 0;
		eager[f] = 1;
		for (int k = 0; k < p->fields.nlazy; k++)
			if (p->col[k] == f)
				eager[f] = 0;
		for (int k = 0; k < p->fields.neager; k++) {
			if (strcmp(name, p->fields.eager[k].col) == 0) {
				name = p->fields.eager[k].field;
				number[f] = p->fields.eager[k].number;
				break;
			}
		}
		lua_pushstring(L, name);
	}
	lua_createtable(L, nr, 0);
	for (int r = 0; r < nr; r++) {
		lua_createtable(L, 0, 8);
		for (int f = 0; f < nf; f++) {
			if (!eager[f] || PQgetisnull(res, r, f))
				continue;
			lua_pushvalue(L, keys + f);
			if (number[f])
				lua_pushnumber(L, strtod(PQgetvalue(res, r, f), NULL));
			else
				lua_pushlstring(L, PQgetvalue(res, r, f), PQgetlength(res, r, f));
			lua_rawset(L, -3);
		}
		lua_pushliteral(L, "_page");
		lua_pushvalue(L, page);
		lua_rawset(L, -3);
		lua_pushliteral(L, "_row");
		lua_pushinteger(L, r + 1);
		lua_rawset(L, -3);
		lua_rawseti(L, -2, r + 1);
	}
	/* drop the key strings below the result */
	if (nf > 0) {
		lua_replace(L, keys);
		lua_settop(L, keys);
	}
}

/* Push the rows of @res as event tables (see above). Takes @res over. */
static void push_events(lua_State *L, PGresult *res, const struct ph_l_fields *fields)
{
	push_page(L, res, fields);
	push_page_events(L, lua_gettop(L));
	lua_remove(L, -2);
}

/* page:events() -> array of event tables (a new one on every call) */
static int ph_l_page_events(lua_State *L)
{
	luaL_checkudata(L, 1, PH_PAGE_MT);
	push_page_events(L, 1);
	return 1;
}

/* page:count() -> number of rows */
static int ph_l_page_count(lua_State *L)
{
	ph_l_page_t *p = luaL_checkudata(L, 1, PH_PAGE_MT);

	lua_pushinteger(L, p->res ? PQntuples(p->res) : 0);
	return 1;
}

/* page:bytes() -> the size of its values (what the page holds in memory,
 * near enough): the worker keeps pages of large events small */
static int ph_l_page_bytes(lua_State *L)
{
	ph_l_page_t *p = luaL_checkudata(L, 1, PH_PAGE_MT);
	int nr = p->res ? PQntuples(p->res) : 0, nf = p->res ? PQnfields(p->res) : 0;
	double n = 0;

	for (int r = 0; r < nr; r++)
		for (int f = 0; f < nf; f++)
			n += PQgetlength(p->res, r, f);
	lua_pushnumber(L, n);
	return 1;
}

/* page:last() -> tx (text), position of the last row | nil (empty page):
 * where the read after this page starts */
static int ph_l_page_last(lua_State *L)
{
	ph_l_page_t *p = luaL_checkudata(L, 1, PH_PAGE_MT);
	int n = p->res ? PQntuples(p->res) : 0;
	int tx = p->res ? PQfnumber(p->res, p->fields.last_tx) : -1;
	int pos = p->res ? PQfnumber(p->res, p->fields.last_pos) : -1;

	if (n == 0 || tx < 0 || pos < 0) {
		lua_pushnil(L);
		return 1;
	}
	lua_pushstring(L, PQgetvalue(p->res, n - 1, tx));
	lua_pushnumber(L, strtod(PQgetvalue(p->res, n - 1, pos), NULL));
	return 2;
}

static int ph_l_conn_events(lua_State *L)
{
	ph_l_conn *c = check_c(L);
	int nret;
	PGresult *res = run(L, c, 0, &nret);

	if (!res)
		return nret;
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
		return push_error(L, c->conn, res);
	push_events(L, res, &c->fields);
	return 1;
}

/* conn:notifies(timeout_s) -> array of {channel=, payload=, pid=} (maybe empty),
 * or nil, msg, code when the connection broke. */
static int ph_l_conn_notifies(lua_State *L)
{
	PGconn *conn = check_conn(L);
	double timeout = luaL_optnumber(L, 2, 0);
	PGnotify *n;
	int i = 0;

	if (!PQconsumeInput(conn))
		return push_error(L, conn, NULL);
	n = PQnotifies(conn);
	if (!n && timeout > 0) {
		struct pollfd p = { .fd = PQsocket(conn), .events = POLLIN };

		poll(&p, 1, (int)(timeout * 1000));
		if (!PQconsumeInput(conn))
			return push_error(L, conn, NULL);
		n = PQnotifies(conn);
	}
	lua_newtable(L);
	for (; n; n = PQnotifies(conn)) {
		lua_createtable(L, 0, 3);
		lua_pushstring(L, n->relname);
		lua_setfield(L, -2, "channel");
		lua_pushstring(L, n->extra);
		lua_setfield(L, -2, "payload");
		lua_pushinteger(L, n->be_pid);
		lua_setfield(L, -2, "pid");
		lua_rawseti(L, -2, ++i);
		PQfreemem(n);
	}
	return 1;
}

static int ph_l_conn_ok(lua_State *L)
{
	ph_l_conn *c = luaL_checkudata(L, 1, PH_CONN_MT);

	lua_pushboolean(L, c->conn && PQstatus(c->conn) == CONNECTION_OK);
	return 1;
}

static int ph_l_conn_pid(lua_State *L)
{
	lua_pushinteger(L, PQbackendPID(check_conn(L)));
	return 1;
}

/* conn:in_transaction() -> true while a transaction block is open (or failed) */
static int ph_l_conn_in_tx(lua_State *L)
{
	PGTransactionStatusType s = PQtransactionStatus(check_conn(L));

	lua_pushboolean(L, s == PQTRANS_INTRANS || s == PQTRANS_INERROR);
	return 1;
}

/* One name of a map: a string shorter than PH_NAME_MAX (misuse raises). */
static void map_name(lua_State *L, int idx, int n, char *out, const char *what)
{
	size_t len;
	const char *s;

	lua_rawgeti(L, idx, n);
	s = lua_tolstring(L, -1, &len);
	if (!s || len == 0 || len >= PH_NAME_MAX)
		luaL_error(L, "conn:event_fields: %s %d must be a name of 1 to %d bytes", what, n, PH_NAME_MAX - 1);
	memcpy(out, s, len + 1);
	lua_pop(L, 1);
}

/* Read the list at field @key of the table at @idx into @out. */
static int map_list(lua_State *L, int idx, const char *key, struct ph_l_field *out, int numbers)
{
	int n;

	lua_getfield(L, idx, key);
	luaL_checktype(L, -1, LUA_TTABLE);
	n = (int)lua_objlen(L, -1);
	if (n > PH_FIELDS_MAX)
		luaL_error(L, "conn:event_fields: at most %d %s fields", PH_FIELDS_MAX, key);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, -1, i);
		luaL_checktype(L, -1, LUA_TTABLE);
		map_name(L, lua_gettop(L), 1, out[i - 1].col, "column");
		map_name(L, lua_gettop(L), 2, out[i - 1].field, "field");
		lua_getfield(L, -1, "number");
		out[i - 1].number = numbers && lua_toboolean(L, -1);
		lua_pop(L, 2);
	}
	lua_pop(L, 1);
	return n;
}

/*
 * conn:event_fields{ eager = { { col, field [, number = true] }, ... },
 *                    lazy = { { col, field }, ... }, last = { tx_col, pos_col } }
 * How conn:events, send_events and send_page make events of rows: eager
 * columns are copied into each event table under their field name (as a
 * number with number = true; other columns keep their name, as text), lazy
 * ones stay in the page for page:text(row, field), and page:last() reads
 * the two columns of `last`. Until called, rows keep their column names
 * and nothing is lazy.
 */
static int ph_l_conn_event_fields(lua_State *L)
{
	ph_l_conn *c = check_c(L);
	struct ph_l_fields f;

	memset(&f, 0, sizeof(f));
	luaL_checktype(L, 2, LUA_TTABLE);
	f.neager = map_list(L, 2, "eager", f.eager, 1);
	f.nlazy = map_list(L, 2, "lazy", f.lazy, 0);
	lua_getfield(L, 2, "last");
	luaL_checktype(L, -1, LUA_TTABLE);
	map_name(L, lua_gettop(L), 1, f.last_tx, "last");
	map_name(L, lua_gettop(L), 2, f.last_pos, "last");
	lua_pop(L, 1);
	c->fields = f;
	return 0;
}

static int ph_l_conn_close(lua_State *L)
{
	ph_l_conn *c = luaL_checkudata(L, 1, PH_CONN_MT);

	if (c->conn)
		PQfinish(c->conn);
	c->conn = NULL;
	end_sync(L, c);
	ph_stmts_free(c->pipe.stmts);
	ph_pipe_release(&c->pipe);
	ph_pipe_init(&c->pipe, NULL, NULL);
	return 0;
}

static const luaL_Reg conn_methods[] = {
	{ "exec", ph_l_conn_exec },
	{ "query", ph_l_conn_query },
	{ "events", ph_l_conn_events },
	{ "pipeline", ph_l_conn_pipeline },
	{ "send", ph_l_conn_send },
	{ "send_query", ph_l_conn_send_query },
	{ "send_events", ph_l_conn_send_events },
	{ "send_page", ph_l_conn_send_page },
	{ "send_as", ph_l_conn_send_as },
	{ "send_query_as", ph_l_conn_send_query_as },
	{ "send_events_as", ph_l_conn_send_events_as },
	{ "send_page_as", ph_l_conn_send_page_as },
	{ "query_as", ph_l_conn_query_as },
	{ "pending", ph_l_conn_pending },
	{ "event_fields", ph_l_conn_event_fields },
	{ "sync", ph_l_conn_sync },
	{ "flush", ph_l_conn_flush },
	{ "consume", ph_l_conn_consume },
	{ "take", ph_l_conn_take },
	{ "notifies", ph_l_conn_notifies },
	{ "ok", ph_l_conn_ok },
	{ "pid", ph_l_conn_pid },
	{ "in_transaction", ph_l_conn_in_tx },
	{ "close", ph_l_conn_close },
	{ NULL, NULL }
};

static const luaL_Reg page_methods[] = {
	{ "text", ph_l_page_text },
	{ "events", ph_l_page_events },
	{ "count", ph_l_page_count },
	{ "last", ph_l_page_last },
	{ "bytes", ph_l_page_bytes },
	{ NULL, NULL }
};

/* A userdata class: metatable @name with @gc, and @methods in a table of
 * their own as __index. Events carry their page (e._page), so scripts can
 * reach a page: the methods table holds no __gc (calling it would free the
 * result under every other event of the page), and __metatable = false
 * makes getmetatable() return false and keeps the metatable out of reach.
 * luaL_checkudata reads the real metatable, so methods still work. */
static void new_class(lua_State *L, const char *name, lua_CFunction gc, const luaL_Reg *methods)
{
	luaL_newmetatable(L, name);
	lua_newtable(L);
	luaL_register(L, NULL, methods);
	lua_setfield(L, -2, "__index");
	lua_pushcfunction(L, gc);
	lua_setfield(L, -2, "__gc");
	lua_pushboolean(L, 0);
	lua_setfield(L, -2, "__metatable");
	lua_pop(L, 1);
}

void ph_l_pg_open(lua_State *L)
{
	new_class(L, PH_CONN_MT, ph_l_conn_close, conn_methods);
	new_class(L, PH_PAGE_MT, ph_l_page_gc, page_methods);
}
