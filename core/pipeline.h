/*
 * pipeline.h - libpq pipeline mode with a record of what was sent: the
 * statements since the last sync, in order, with the Parse messages of the
 * ones prepared on the way (stmt.h), so that each result is routed to its
 * statement, an error is charged to the statement that caused it (a failed
 * Parse's to the statement it was for), and the prepared statements the
 * server lost are made again. Nothing here knows about Lua: the binding
 * (bindings/lua_pg.c) turns results into Lua values by the kind they were
 * sent as.
 */
#ifndef PH_PIPELINE_H
#define PH_PIPELINE_H

#include <libpq-fe.h>

#include "stmt.h"

/* How a statement's result is wanted; PH_PIPE_PREPARE is a Parse (no
 * statement of its own, its result is not one). */
enum { PH_PIPE_COUNT, PH_PIPE_ROWS, PH_PIPE_EVENTS, PH_PIPE_PAGE, PH_PIPE_PREPARE };

struct ph_pipe_sent {
	unsigned char kind;
	char name[15];		/* prepared statement name, or "" */
};

struct ph_pipe {
	PGconn *conn;
	ph_stmts *stmts;	/* NULL: nothing is prepared */
	int pending;		/* statements sent since the last sync */
	int nsent, scap;	/* entries of sent[] (statements and Parses) */
	struct ph_pipe_sent *sent;
	int k, q;		/* entries and statements whose results were read */
	PGresult *err;		/* the first error a read met before the sync */
	int err_index;
};

/* What one read of the results has met: the first error (and its
 * statement's number) and, for callers that keep no results, the last. */
struct ph_pipe_seen {
	PGresult *last, *err;
	int err_index;
};

/** ph_pipe_init() - a record for @conn, preparing through @stmts (may be NULL). */
void ph_pipe_init(struct ph_pipe *p, PGconn *conn, ph_stmts *stmts);

/** ph_pipe_release() - free what @p holds (not the connection or @stmts). */
void ph_pipe_release(struct ph_pipe *p);

/** ph_pipe_reset() - forget what was queued: after a sync, or when the mode changed. */
void ph_pipe_reset(struct ph_pipe *p);

/**
 * ph_pipe_send() - queue @sql with @n text parameters as a statement of
 * @kind; when @may_prepare, prepared if the statement cache says so.
 *
 * Return: its number since the last sync (1-based), 0 when libpq refused
 * it (the message is on the connection), -1 when out of memory.
 */
int ph_pipe_send(struct ph_pipe *p, int kind, const char *sql, int n, const char *const *vals, int may_prepare);

/**
 * ph_pipe_account() - route @r, the next result read from the connection.
 * @seen: this read's first error (kept there, not to be freed by the caller)
 * @kind: the statement's kind
 * @kept: set when @r became @seen->err
 *
 * Return: the number of the statement @r belongs to, or 0 when it was a
 * Parse's (then @r is taken over: cleared, or kept as the error of the
 * statement it was for).
 */
int ph_pipe_account(struct ph_pipe *p, struct ph_pipe_seen *seen, PGresult *r, int *kind, int *kept);

#endif
