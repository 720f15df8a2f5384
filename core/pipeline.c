/*
 * pipeline.c - see pipeline.h.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pg.h"
#include "pipeline.h"

void ph_pipe_init(struct ph_pipe *p, PGconn *conn, ph_stmts *stmts)
{
	memset(p, 0, sizeof(*p));
	p->conn = conn;
	p->stmts = stmts;
}

void ph_pipe_reset(struct ph_pipe *p)
{
	p->pending = p->nsent = p->k = p->q = 0;
}

void ph_pipe_release(struct ph_pipe *p)
{
	free(p->sent);
	p->sent = NULL;
	p->scap = 0;
	if (p->err)
		PQclear(p->err);
	p->err = NULL;
	ph_pipe_reset(p);
}

/* Note what goes into the pipeline next; -1 when out of memory. */
static int add_sent(struct ph_pipe *p, int kind, const char *name, int tag)
{
	if (p->nsent >= p->scap) {
		int cap = p->scap ? p->scap * 2 : 64;
		struct ph_pipe_sent *n = realloc(p->sent, (size_t)cap * sizeof(*n));

		if (!n)
			return -1;
		p->sent = n;
		p->scap = cap;
	}
	p->sent[p->nsent].kind = (unsigned char)kind;
	p->sent[p->nsent].tag = tag;
	snprintf(p->sent[p->nsent].name, sizeof(p->sent[0].name), "%s", name ? name : "");
	p->nsent++;
	return 0;
}

int ph_pipe_send(struct ph_pipe *p, int kind, int tag, const char *sql, int n, const char *const *vals,
		 int may_prepare)
{
	int parse = 0;
	const char *name = may_prepare && p->stmts ? ph_stmts_use(p->stmts, sql, &parse) : NULL;

	if (parse) {
		/* its error is the statement's: the same tag */
		if (add_sent(p, PH_PIPE_PREPARE, name, tag) != 0)
			return -1;
		if (!PQsendPrepare(p->conn, name, sql, n, NULL)) {
			ph_stmts_forget(p->stmts, name);
			p->nsent--;
			return 0;
		}
	}
	if (add_sent(p, kind, name, tag) != 0)
		return -1;
	if (name ? !PQsendQueryPrepared(p->conn, name, n, vals, NULL, NULL, 0)
		 : !PQsendQueryParams(p->conn, sql, n, NULL, vals, NULL, NULL, 0)) {
		p->nsent--;
		return 0;
	}
	return ++p->pending;
}

int ph_pipe_account(struct ph_pipe *p, struct ph_pipe_seen *seen, PGresult *r, int *kind, int *kept)
{
	const struct ph_pipe_sent *sn = p->k < p->nsent ? &p->sent[p->k] : NULL;
	ExecStatusType st = PQresultStatus(r);
	int failed = st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK;

	*kind = sn ? sn->kind : PH_PIPE_COUNT;
	*kept = 0;
	p->k++;
	/* a Parse that failed or was skipped created nothing; a plan whose
	 * result columns changed (0A000) must be made anew, and one the
	 * session lost (26000: DEALLOCATE, DISCARD) too */
	if (sn && sn->name[0] && p->stmts &&
	    ((*kind == PH_PIPE_PREPARE && failed) ||
	     (st == PGRES_FATAL_ERROR && (strcmp(ph_pg_errcode(p->conn, r), "0A000") == 0 ||
					  strcmp(ph_pg_errcode(p->conn, r), "26000") == 0))))
		ph_stmts_forget(p->stmts, sn->name);
	if (*kind == PH_PIPE_PREPARE) {
		/* not a statement: its error is the next statement's */
		if (st == PGRES_FATAL_ERROR && !seen->err) {
			seen->err = r;
			seen->err_index = p->q + 1;
			seen->err_tag = sn->tag;
		} else {
			PQclear(r);
		}
		return 0;
	}
	p->q++;
	if ((st == PGRES_FATAL_ERROR || st == PGRES_NONFATAL_ERROR) && !seen->err) {
		seen->err = r;
		seen->err_index = p->q;
		seen->err_tag = sn ? sn->tag : 0;
		*kept = 1;
	}
	return p->q;
}

void ph_pipe_lost(const struct ph_pipe *p, struct ph_pipe_seen *seen)
{
	if (seen->err)
		return;
	seen->err_index = p->q + 1;
	/* the entry not read next is the statement's, or its Parse's */
	seen->err_tag = p->k < p->nsent ? p->sent[p->k].tag : 0;
}

int ph_pipe_pending_next(const struct ph_pipe *p, struct ph_pipe_walk *w, int *tag)
{
	if (w->entry < p->k) {
		w->entry = p->k;
		w->q = p->q;
	}
	while (w->entry < p->nsent) {
		const struct ph_pipe_sent *sn = &p->sent[w->entry++];

		/* a Parse is no statement */
		if (sn->kind != PH_PIPE_PREPARE) {
			*tag = sn->tag;
			return ++w->q;
		}
	}
	return 0;
}
