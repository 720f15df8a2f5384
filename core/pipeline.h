/*
 * pipeline.h - libpq pipeline mode with a record of what was sent: the
 * statements since the last sync, in order, each with the tag its caller
 * gave, and the Parse messages of the ones prepared on the way (stmt.h),
 * so that each result is routed to its statement, an error comes back with
 * the tag of the statement that caused it (a failed Parse's with the tag
 * of the statement it was for), the tags of the statements still waiting
 * can be listed, and the prepared statements the server lost are made
 * again. A tag is an int the caller chooses and this file never reads: the
 * binding (bindings/lua_pg.c) codes a Lua value in it or keeps the value
 * aside, so the worker asks "which event caused this" instead of
 * mirroring statement numbers. Nothing here knows about Lua: the binding turns results into Lua
 * values by the kind they were sent as.
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
	int tag;		/* the caller's; a Parse has its statement's */
};

struct ph_pipe {
	PGconn *conn;
	ph_stmts *stmts;	/* NULL: nothing is prepared */
	int pending;		/* statements sent since the last sync */
	int nsent, scap;	/* entries of sent[] (statements and Parses) */
	struct ph_pipe_sent *sent;
	int k, q;		/* entries and statements whose results were read */
	PGresult *err;		/* the first error a read met before the sync */
	int err_index, err_tag;
};

/* What one read of the results has met: the first error (and its
 * statement's number and tag) and, for callers that keep no results, the
 * last. An err_index past the statements sent is no statement's (the
 * connection broke after the last one): then err_tag is 0. */
struct ph_pipe_seen {
	PGresult *last, *err;
	int err_index, err_tag;
};

/** ph_pipe_init() - a record for @conn, preparing through @stmts (may be NULL). */
void ph_pipe_init(struct ph_pipe *p, PGconn *conn, ph_stmts *stmts);

/** ph_pipe_release() - free what @p holds (not the connection or @stmts). */
void ph_pipe_release(struct ph_pipe *p);

/** ph_pipe_reset() - forget what was queued: after a sync, or when the mode changed. */
void ph_pipe_reset(struct ph_pipe *p);

/**
 * ph_pipe_send() - queue @sql with @n text parameters as a statement of
 * @kind, tagged @tag (the caller's, given back with its error and by
 * ph_pipe_pending_next); when @may_prepare, prepared if the statement
 * cache says so.
 *
 * Return: its number since the last sync (1-based), 0 when libpq refused
 * it (the message is on the connection), -1 when out of memory.
 */
int ph_pipe_send(struct ph_pipe *p, int kind, int tag, const char *sql, int n, const char *const *vals,
		 int may_prepare);

/**
 * ph_pipe_account() - route @r, the next result read from the connection.
 * @seen: this read's first error, its statement's number and tag (kept
 *        there, not to be freed by the caller)
 * @kind: the statement's kind
 * @kept: set when @r became @seen->err
 *
 * Return: the number of the statement @r belongs to, or 0 when it was a
 * Parse's (then @r is taken over: cleared, or kept as the error of the
 * statement it was for).
 */
int ph_pipe_account(struct ph_pipe *p, struct ph_pipe_seen *seen, PGresult *r, int *kind, int *kept);

/**
 * ph_pipe_lost() - the connection broke while results were still due:
 * unless @seen has an error already, charge it to the first statement
 * whose result was not read (its number and tag; a number past the last
 * statement and tag 0 when every result was read).
 */
void ph_pipe_lost(const struct ph_pipe *p, struct ph_pipe_seen *seen);

/* Where a walk over the statements still waiting stands: start at { 0 }. */
struct ph_pipe_walk {
	int entry, q;
};

/**
 * ph_pipe_pending_next() - the next of the statements whose results were
 * not read yet, in the order they were sent (Parses are none of them).
 * @w: the walk, { 0 } at the start; @p must not change during it
 * @tag: set to the statement's tag
 *
 * Return: the statement's number since the last sync, 0 after the last.
 */
int ph_pipe_pending_next(const struct ph_pipe *p, struct ph_pipe_walk *w, int *tag);

#endif
