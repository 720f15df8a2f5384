/*
 * pipeline_test.c - checks of core/pipeline.c (which statement a result or
 * an error belongs to, and its tag), run by spec/core/pipeline_spec.lua.
 * No server: the three libpq calls that send are defined here (they take
 * precedence over libpq's own), results are made with PQmakeEmptyPGresult
 * and handed to ph_pipe_account in the order a server would answer.
 * Prints "ok <name>" per check; exits non-zero at the first failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/pipeline.h"
#include "../../core/stmt.h"
#include "check.h"

/* What the "connection" was asked to send; refuse makes the next send fail. */
static int parses, executes, refuse;

int PQsendPrepare(PGconn *conn, const char *stmtName, const char *query, int nParams, const Oid *paramTypes)
{
	(void)conn, (void)stmtName, (void)query, (void)nParams, (void)paramTypes;
	if (refuse)
		return refuse = 0;
	parses++;
	return 1;
}

int PQsendQueryPrepared(PGconn *conn, const char *stmtName, int nParams, const char *const *paramValues,
			const int *paramLengths, const int *paramFormats, int resultFormat)
{
	(void)conn, (void)stmtName, (void)nParams, (void)paramValues, (void)paramLengths, (void)paramFormats;
	(void)resultFormat;
	if (refuse)
		return refuse = 0;
	executes++;
	return 1;
}

int PQsendQueryParams(PGconn *conn, const char *command, int nParams, const Oid *paramTypes,
		      const char *const *paramValues, const int *paramLengths, const int *paramFormats,
		      int resultFormat)
{
	(void)conn, (void)command, (void)nParams, (void)paramTypes, (void)paramValues, (void)paramLengths;
	(void)paramFormats, (void)resultFormat;
	if (refuse)
		return refuse = 0;
	executes++;
	return 1;
}

/* Route one made result of @status; returns the statement number it was
 * charged to (0: a Parse's). */
static int answer(struct ph_pipe *p, struct ph_pipe_seen *seen, ExecStatusType status)
{
	PGresult *r = PQmakeEmptyPGresult(NULL, status);
	int kind, kept, q;

	CHECK(r);
	q = ph_pipe_account(p, seen, r, &kind, &kept);
	/* a statement's result that did not become the error is the caller's */
	if (q && !kept)
		PQclear(r);
	return q;
}

static void seen_clear(struct ph_pipe_seen *seen)
{
	if (seen->err)
		PQclear(seen->err);
	memset(seen, 0, sizeof(*seen));
}

/* The tags of the statements still waiting, as "tag,tag,..." with their numbers. */
static const char *pending(const struct ph_pipe *p)
{
	static char buf[256];
	struct ph_pipe_walk w = { 0 };
	int q, tag;
	size_t len = 0;

	buf[0] = '\0';
	while ((q = ph_pipe_pending_next(p, &w, &tag)) > 0)
		len += (size_t)snprintf(buf + len, sizeof(buf) - len, "%s%d:%d", len ? "," : "", q, tag);
	return buf;
}

/* An error is charged to the tag of its statement, never a neighbour's. */
static void errors_carry_their_tag(void)
{
	struct ph_pipe p;
	struct ph_pipe_seen seen = { 0 };

	ph_pipe_init(&p, NULL, NULL);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 70, "SELECT 1", 0, NULL, 1) == 1);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 80, "SELECT 1/0", 0, NULL, 1) == 2);
	CHECK(ph_pipe_send(&p, PH_PIPE_ROWS, 90, "SELECT 3", 0, NULL, 1) == 3);
	CHECK(strcmp(pending(&p), "1:70,2:80,3:90") == 0);
	CHECK(answer(&p, &seen, PGRES_COMMAND_OK) == 1);
	CHECK(!seen.err);
	CHECK(strcmp(pending(&p), "2:80,3:90") == 0);
	CHECK(answer(&p, &seen, PGRES_FATAL_ERROR) == 2);
	CHECK(answer(&p, &seen, PGRES_PIPELINE_ABORTED) == 3);
	CHECK(seen.err && seen.err_index == 2 && seen.err_tag == 80);
	CHECK(strcmp(pending(&p), "") == 0);
	seen_clear(&seen);

	/* after the sync the numbers start again, the old tags are gone */
	ph_pipe_reset(&p);
	CHECK(strcmp(pending(&p), "") == 0);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 4, "SELECT 1", 0, NULL, 0) == 1);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 5, "SELECT 1/0", 0, NULL, 0) == 2);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 6, "SELECT 1", 0, NULL, 0) == 3);
	CHECK(strcmp(pending(&p), "1:4,2:5,3:6") == 0);
	CHECK(answer(&p, &seen, PGRES_TUPLES_OK) == 1);
	CHECK(answer(&p, &seen, PGRES_FATAL_ERROR) == 2);
	CHECK(answer(&p, &seen, PGRES_PIPELINE_ABORTED) == 3);
	CHECK(seen.err_index == 2 && seen.err_tag == 5);
	seen_clear(&seen);
	ph_pipe_release(&p);
	printf("ok errors carry their tag\n");
}

/* A statement prepared on the way: its Parse comes first, is no statement
 * of its own, and its error is charged to the statement it was for. */
static void parses_belong_to_their_statement(void)
{
	struct ph_pipe p;
	struct ph_pipe_seen seen = { 0 };
	ph_stmts *stmts = ph_stmts_new(16);
	const char *T = "SELECT $1::int";

	CHECK(stmts);
	ph_pipe_init(&p, NULL, stmts);
	/* first use: unnamed; second: Parse + execute; third: by name */
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 11, T, 0, NULL, 1) == 1);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 12, T, 0, NULL, 1) == 2);
	CHECK(parses == 1);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 13, T, 0, NULL, 1) == 3);
	CHECK(parses == 1);
	CHECK(p.nsent == 4);
	CHECK(strcmp(pending(&p), "1:11,2:12,3:13") == 0);
	CHECK(answer(&p, &seen, PGRES_COMMAND_OK) == 1);
	/* the Parse fails: statement 2's error, tag 12 (not 11, not 13) */
	CHECK(answer(&p, &seen, PGRES_FATAL_ERROR) == 0);
	CHECK(seen.err && seen.err_index == 2 && seen.err_tag == 12);
	CHECK(strcmp(pending(&p), "2:12,3:13") == 0);
	CHECK(answer(&p, &seen, PGRES_PIPELINE_ABORTED) == 2);
	CHECK(answer(&p, &seen, PGRES_PIPELINE_ABORTED) == 3);
	CHECK(seen.err_index == 2 && seen.err_tag == 12);
	seen_clear(&seen);
	ph_pipe_reset(&p);

	/* the failed Parse made nothing: the next use prepares again, and a
	 * failure of the statement itself after a good Parse is its own */
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 21, "SELECT 2", 0, NULL, 1) == 1);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 22, T, 0, NULL, 1) == 2);
	CHECK(parses == 2);
	CHECK(answer(&p, &seen, PGRES_COMMAND_OK) == 1);
	CHECK(answer(&p, &seen, PGRES_COMMAND_OK) == 0);
	CHECK(!seen.err);
	CHECK(answer(&p, &seen, PGRES_FATAL_ERROR) == 2);
	CHECK(seen.err_index == 2 && seen.err_tag == 22);
	seen_clear(&seen);
	ph_pipe_release(&p);
	ph_stmts_free(stmts);
	printf("ok parses belong to their statement\n");
}

/* A send libpq refuses leaves no entry: the next statement gets the number
 * and the tags stay in step. */
static void refused_sends_leave_no_trace(void)
{
	struct ph_pipe p;
	struct ph_pipe_seen seen = { 0 };
	ph_stmts *stmts = ph_stmts_new(16);
	const char *T = "SELECT $1::text";

	CHECK(stmts);
	ph_pipe_init(&p, NULL, stmts);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 1, T, 0, NULL, 1) == 1);
	refuse = 1;
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 2, "SELECT 2", 0, NULL, 1) == 0);
	/* the Parse of the second use refused: not prepared, no entry */
	refuse = 1;
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 3, T, 0, NULL, 1) == 0);
	CHECK(p.nsent == 1 && p.pending == 1);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 4, "SELECT 4", 0, NULL, 1) == 2);
	CHECK(strcmp(pending(&p), "1:1,2:4") == 0);
	CHECK(answer(&p, &seen, PGRES_COMMAND_OK) == 1);
	CHECK(answer(&p, &seen, PGRES_FATAL_ERROR) == 2);
	CHECK(seen.err_index == 2 && seen.err_tag == 4);
	seen_clear(&seen);
	ph_pipe_release(&p);
	ph_stmts_free(stmts);
	printf("ok refused sends leave no trace\n");
}

/* The connection broke: charged to the first statement not read (also
 * when its Parse is what was next), or to none after the last. */
static void a_lost_connection(void)
{
	struct ph_pipe p;
	struct ph_pipe_seen seen = { 0 };
	ph_stmts *stmts = ph_stmts_new(16);
	const char *T = "SELECT $1::bigint";

	CHECK(stmts);
	ph_pipe_init(&p, NULL, stmts);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 31, T, 0, NULL, 1) == 1);
	CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 32, T, 0, NULL, 1) == 2); /* Parse + execute */
	CHECK(answer(&p, &seen, PGRES_COMMAND_OK) == 1);
	ph_pipe_lost(&p, &seen);
	CHECK(seen.err_index == 2 && seen.err_tag == 32);
	/* an error met before stays the one reported */
	seen.err = PQmakeEmptyPGresult(NULL, PGRES_FATAL_ERROR);
	seen.err_index = 1;
	seen.err_tag = 31;
	ph_pipe_lost(&p, &seen);
	CHECK(seen.err_index == 1 && seen.err_tag == 31);
	seen_clear(&seen);
	CHECK(answer(&p, &seen, PGRES_COMMAND_OK) == 0);
	CHECK(answer(&p, &seen, PGRES_COMMAND_OK) == 2);
	ph_pipe_lost(&p, &seen);
	CHECK(seen.err_index == 3 && seen.err_tag == 0);
	ph_pipe_release(&p);
	ph_stmts_free(stmts);
	printf("ok a lost connection\n");
}

/* Many statements: the record grows, every tag stays with its statement. */
static void many_statements(void)
{
	struct ph_pipe p;
	struct ph_pipe_seen seen = { 0 };
	struct ph_pipe_walk w = { 0 };
	int q, tag, n = 0;

	ph_pipe_init(&p, NULL, NULL);
	for (int i = 1; i <= 1000; i++)
		CHECK(ph_pipe_send(&p, PH_PIPE_COUNT, 1000 + i, "SELECT 1", 0, NULL, 1) == i);
	for (int i = 1; i <= 500; i++)
		CHECK(answer(&p, &seen, PGRES_COMMAND_OK) == i);
	while ((q = ph_pipe_pending_next(&p, &w, &tag)) > 0) {
		CHECK(q == 501 + n && tag == 1501 + n);
		n++;
	}
	CHECK(n == 500);
	CHECK(answer(&p, &seen, PGRES_NONFATAL_ERROR) == 501);
	CHECK(seen.err_index == 501 && seen.err_tag == 1501);
	seen_clear(&seen);
	ph_pipe_release(&p);
	printf("ok many statements\n");
}

int main(void)
{
	errors_carry_their_tag();
	parses_belong_to_their_statement();
	refused_sends_leave_no_trace();
	a_lost_connection();
	many_statements();
	return 0;
}
