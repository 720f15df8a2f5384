/*
 * surface.c - see surface.h. One PostgreSQL connection of its own,
 * connected with PQconnectStart/PQconnectPoll and queried with
 * PQsendQuery*, every step driven by a uv_poll on its socket: a slow or
 * lost database delays answers, never the loop. Queries run one at a time
 * from a FIFO (the snapshot, and the /wait checks).
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "http.h"
#include "log.h"
#include "pg.h"
#include "subscribe.h"
#include "surface.h"

/* subscribers and waiters hold their connections: the rest must stay */
_Static_assert(PH_SUB_MAX + PH_WAIT_MAX_WAITERS + 64 <= PH_HTTP_CONNECTIONS,
	       "PH_HTTP_CONNECTIONS leaves no room for /metrics and /health");

enum route { R_METRICS, R_READY, R_STATUS, R_PAGE };

/* A request waiting for the snapshot. */
struct snapreq {
	struct ph_http_req *req;
	enum route route;
	struct snapreq *next;
};

struct waiter {
	struct ph_surface *s;
	struct ph_http_req *req;
	char *proj, *stream;
	long long version;
	uv_timer_t *timer;
	int queued;		/* its check is queued or running */
	int again;		/* check once more when it ends */
	int timed_out;
	struct waiter *prev, *next;
};

/* A query in the FIFO: the session's settings, the snapshot, or a check of w. */
enum qkind { Q_SETUP, Q_SNAPSHOT, Q_CHECK, Q_CALL };

struct query {
	enum qkind kind;
	struct waiter *w;
	/* Q_CALL: ph_surface_query() */
	char *sql;
	char **params;
	int n;
	void (*cb)(void *, PGresult *);
	void *arg;
	struct query *next;
};

struct ph_surface {
	uv_loop_t *loop;
	struct ph_http *http;
	char *dsn;
	int (*known)(void *, const char *);
	void *arg;
	struct ph_metrics m;
	int loaded, load_errors;

	PGconn *conn;
	uv_poll_t *poll;
	int poll_fd;
	int connected;		/* 0: none or connecting */
	uv_timer_t *retry;
	unsigned failures;
	char dberr[512];	/* why there is no connection ("" while fine) */
	struct query *qhead, *qtail;
	int sent;		/* the head query was sent */
	PGresult *res[2];
	int nres;

	PGresult *rows, *doc;	/* the snapshot: projection_status(), status_json() */
	uint64_t snap_at;
	int have_snap;
	char snap_err[512];	/* the snapshot's error ("" when it is good) */
	char stall_after[32];	/* PROJHOST_STALL_AFTER, as the SQL parameter */
	int refreshing;
	struct snapreq *snapreqs;

	struct waiter *waiters;
	int nwaiters;

	struct ph_subs *subs;
};

/* Connecting and each query are bounded: a stuck statement (a lock, a
 * slow server) fails after this instead of holding every answer behind it. */
#define PH_SURFACE_CONNECT_MS 10000
/* ...and what "stalled" means is the host's PROJHOST_STALL_AFTER, for
 * every statement of the connection (a parameter here, read back below) */
static const char SETUP_SQL[] = "SELECT set_config('statement_timeout', '5s', false),"
	" set_config('projhost.stall_after', $1, false)";

static const char SNAPSHOT_SQL[] =
	"SELECT projection, status, events_behind::float8, lag_seconds, parked::float8, stalled, error,"
	" eta_seconds FROM projhost.projection_status(NULL, current_setting('projhost.stall_after')::float8);\n"
	"SELECT j::text, j->'horizon'->>'pid', CASE WHEN jsonb_typeof(j->'horizon'->'age_s') = 'number'"
	" THEN (j->'horizon'->>'age_s')::float8 END, j->'horizon'->>'database', j->'horizon'->>'state',"
	" j->'horizon'->>'query' FROM projhost.status_json(NULL, current_setting('projhost.stall_after')::float8) j";

static void db_connect(struct ph_surface *s);
static void pump(struct ph_surface *s);
static void call_done(struct query *q, PGresult *r);
static void answer_snapreqs(struct ph_surface *s);
static void check(struct waiter *w);

/* ---- small text helpers ---- */

static void json_str(struct ph_buf *b, const char *v)
{
	ph_buf_add(b, "\"", 1);
	for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
		if (*p == '"' || *p == '\\')
			ph_buf_printf(b, "\\%c", *p);
		else if (*p < 0x20 || *p == 0x7f)
			ph_buf_printf(b, "\\u%04x", *p);
		else
			ph_buf_add(b, (const char *)p, 1);
	}
	ph_buf_add(b, "\"", 1);
}

static void html(struct ph_buf *b, const char *v)
{
	for (const char *p = v ? v : ""; *p; p++) {
		switch (*p) {
		case '<': ph_buf_add(b, "&lt;", 4); break;
		case '>': ph_buf_add(b, "&gt;", 4); break;
		case '&': ph_buf_add(b, "&amp;", 5); break;
		case '"': ph_buf_add(b, "&quot;", 6); break;
		case '\'': ph_buf_add(b, "&#39;", 5); break;
		default: ph_buf_add(b, p, 1);
		}
	}
}

static void respond_buf(struct ph_http_req *r, unsigned status, const char *ctype, struct ph_buf *b)
{
	if (b->failed)
		ph_http_respond(r, 500, "text/plain; charset=utf-8", "out of memory\n", 14);
	else
		ph_http_respond(r, status, ctype, b->s ? b->s : "", b->len);
	ph_buf_free(b);
}

static void respond_error(struct ph_http_req *r, unsigned status, const char *msg)
{
	struct ph_buf b = { 0 };

	ph_buf_add(&b, "{\"error\":", 9);
	json_str(&b, msg);
	ph_buf_add(&b, "}\n", 2);
	respond_buf(r, status, "application/json", &b);
}

/* ---- the connection ---- */

static void on_poll_closed(uv_handle_t *h)
{
	free(h);
}

static void drop_poll(struct ph_surface *s)
{
	if (s->poll) {
		uv_poll_stop(s->poll);
		uv_close((uv_handle_t *)s->poll, on_poll_closed);
		s->poll = NULL;
	}
}

static void on_io(uv_poll_t *p, int status, int events);

static void watch(struct ph_surface *s, int events)
{
	int fd = PQsocket(s->conn);

	if (s->poll && s->poll_fd != fd)
		drop_poll(s);
	if (!s->poll) {
		s->poll = calloc(1, sizeof(*s->poll));
		if (!s->poll || uv_poll_init(s->loop, s->poll, fd) != 0) {
			free(s->poll);
			s->poll = NULL;
			return;
		}
		s->poll->data = s;
		s->poll_fd = fd;
	}
	uv_poll_start(s->poll, events, on_io);
}

static void db_lost(struct ph_surface *s, const char *why);

/* The backoff is over (connect again), or a connect took too long. */
static void on_retry(uv_timer_t *t)
{
	struct ph_surface *s = t->data;

	if (s->conn && !s->connected)
		db_lost(s, "timed out connecting");
	else if (!s->conn)
		db_connect(s);
}

/* The connection failed or was lost: every queued query fails, and a new
 * one is tried with backoff (logged once per outage). */
static void db_lost(struct ph_surface *s, const char *why)
{
	unsigned ms = 500u << (s->failures < 6 ? s->failures : 6);

	if (!s->failures++)
		ph_log(PH_WARN, "host", "http status connection: %s; retrying with backoff", why);
	snprintf(s->dberr, sizeof(s->dberr), "database unreachable: %s", why);
	drop_poll(s);
	PQfinish(s->conn);
	s->conn = NULL;
	s->connected = 0;
	for (int i = 0; i < s->nres; i++)
		PQclear(s->res[i]);
	s->nres = 0;
	s->sent = 0;
	while (s->qhead) {
		struct query *q = s->qhead;
		struct waiter *w = q->w;

		s->qhead = q->next;
		if (q->kind == Q_SETUP) {
			free(q);
			continue;
		}
		if (q->kind == Q_CALL) {
			call_done(q, NULL);
			continue;
		}
		free(q);
		if (!w) {
			s->refreshing = 0;
			snprintf(s->snap_err, sizeof(s->snap_err), "%s", s->dberr);
			s->have_snap = 0;
			answer_snapreqs(s);
		} else {
			w->queued = 0;
			w->again = 0;
			if (w->timed_out)
				check(w);	/* answers 503 at once: there is no connection */
		}
	}
	s->qtail = NULL;
	uv_timer_start(s->retry, on_retry, ms > 30000 ? 30000 : ms, 0);
}

static void connect_step(struct ph_surface *s)
{
	/* a new watch per step: libpq may have closed its socket for the next
	 * host of the DSN and opened another under the same number */
	drop_poll(s);
	switch (PQconnectPoll(s->conn)) {
	case PGRES_POLLING_READING:
		watch(s, UV_READABLE);
		break;
	case PGRES_POLLING_WRITING:
		watch(s, UV_WRITABLE);
		break;
	case PGRES_POLLING_OK:
		uv_timer_stop(s->retry);
		PQsetnonblocking(s->conn, 1);
		s->connected = 1;
		if (s->failures)
			ph_log(PH_INFO, "host", "http status connection: database reachable again");
		s->failures = 0;
		s->dberr[0] = '\0';
		watch(s, UV_READABLE);
		pump(s);
		ph_subs_wake(s->subs);	/* what was appended meanwhile */
		break;
	default: {
		char buf[400];

		db_lost(s, ph_pg_errmsg(s->conn, NULL, buf, sizeof(buf)));
	}
	}
}

static void quiet_notices(void *arg, const char *msg)
{
	(void)arg;
	(void)msg;
}

static int enqueue(struct ph_surface *s, enum qkind kind, struct waiter *w);

/* As ph_pg_connect() does, but without blocking: the DSN expanded after
 * our connect_timeout, so its own wins; libpq does not enforce it for an
 * asynchronous connect, the retry timer does (PH_SURFACE_CONNECT_MS). */
static void db_connect(struct ph_surface *s)
{
	const char *const keys[] = { "connect_timeout", "dbname", NULL };
	const char *const vals[] = { "10", s->dsn, NULL };

	s->conn = PQconnectStartParams(keys, vals, 1);
	if (!s->conn || PQstatus(s->conn) == CONNECTION_BAD) {
		char buf[400];

		db_lost(s, s->conn ? ph_pg_errmsg(s->conn, NULL, buf, sizeof(buf)) : "out of memory");
		return;
	}
	PQsetNoticeProcessor(s->conn, quiet_notices, NULL);
	/* first in the FIFO: whatever is queued meanwhile runs after it (out
	 * of memory: without the statement timeout) */
	(void)enqueue(s, Q_SETUP, NULL);
	uv_timer_start(s->retry, on_retry, PH_SURFACE_CONNECT_MS, 0);
	watch(s, UV_WRITABLE);
}

static void query_done(struct ph_surface *s);

static void on_io(uv_poll_t *p, int status, int events)
{
	struct ph_surface *s = p->data;

	(void)events;
	if (!s->conn)
		return;
	if (!s->connected) {
		connect_step(s);
		return;
	}
	if (status < 0 || !PQconsumeInput(s->conn) || PQstatus(s->conn) == CONNECTION_BAD) {
		char buf[400];

		db_lost(s, ph_pg_errmsg(s->conn, NULL, buf, sizeof(buf)));
		return;
	}
	if (s->sent && PQflush(s->conn) == 1) {
		watch(s, UV_READABLE | UV_WRITABLE);
		return;
	}
	watch(s, UV_READABLE);
	while (s->sent && !PQisBusy(s->conn)) {
		PGresult *r = PQgetResult(s->conn);

		if (!r) {
			query_done(s);
			if (!s->conn)
				return;
			continue;
		}
		if (s->nres < 2)
			s->res[s->nres++] = r;
		else
			PQclear(r);
	}
	/* notices and notifications are not ours: read and forgotten */
	PGnotify *n;

	while (s->conn && (n = PQnotifies(s->conn)))
		PQfreemem(n);
}

/* Send the FIFO's head if nothing runs. */
static void pump(struct ph_surface *s)
{
	struct query *q = s->qhead;
	int ok;

	if (!q || s->sent || !s->connected)
		return;
	if (q->kind == Q_SETUP) {
		const char *params[1] = { s->stall_after };

		ok = PQsendQueryParams(s->conn, SETUP_SQL, 1, NULL, params, NULL, NULL, 0);
	} else if (q->kind == Q_SNAPSHOT) {
		ok = PQsendQuery(s->conn, SNAPSHOT_SQL);
	} else if (q->kind == Q_CALL) {
		ok = PQsendQueryParams(s->conn, q->sql, q->n, NULL, (const char *const *)q->params, NULL, NULL, 0);
	} else {
		char version[24];
		const char *params[3] = { q->w->proj, q->w->stream, version };

		snprintf(version, sizeof(version), "%lld", q->w->version);
		ok = PQsendQueryParams(s->conn, "SELECT projhost.applied($1, $2, $3::bigint)", 3, NULL, params, NULL,
				       NULL, 0);
	}
	if (!ok) {
		char buf[400];

		db_lost(s, ph_pg_errmsg(s->conn, NULL, buf, sizeof(buf)));
		return;
	}
	s->sent = 1;
	watch(s, PQflush(s->conn) == 1 ? UV_READABLE | UV_WRITABLE : UV_READABLE);
}

/* Append @q to the FIFO and send what can be sent. */
static void push(struct ph_surface *s, struct query *q)
{
	if (s->qtail)
		s->qtail->next = q;
	else
		s->qhead = q;
	s->qtail = q;
	pump(s);
}

static int enqueue(struct ph_surface *s, enum qkind kind, struct waiter *w)
{
	struct query *q = calloc(1, sizeof(*q));

	if (!q)
		return -1;
	q->kind = kind;
	q->w = w;
	push(s, q);
	return 0;
}

/* ---- queries of others (subscribe.c) ---- */

/* Answer and free a Q_CALL (@r NULL: it never ran). */
static void call_done(struct query *q, PGresult *r)
{
	q->cb(q->arg, r);
	for (int i = 0; i < q->n; i++)
		free(q->params[i]);
	free(q->params);
	free(q->sql);
	free(q);
}

int ph_surface_query(struct ph_surface *s, const char *sql, int n, const char *const *params,
		     void (*cb)(void *arg, PGresult *res), void *arg)
{
	struct query *q;

	if (!s->connected || !(q = calloc(1, sizeof(*q))))
		return -1;
	q->kind = Q_CALL;
	q->cb = cb;
	q->arg = arg;
	q->sql = strdup(sql);
	q->params = calloc((size_t)n + 1, sizeof(char *));
	for (int i = 0; q->params && i < n; i++)
		if ((q->params[i] = strdup(params[i] ? params[i] : "")))
			q->n = i + 1;
	if (!q->sql || !q->params || q->n != n) {
		for (int i = 0; q->params && i < q->n; i++)
			free(q->params[i]);
		free(q->params);
		free(q->sql);
		free(q);
		return -1;
	}
	push(s, q);
	return 0;
}

void ph_surface_wake(struct ph_surface *s)
{
	ph_subs_wake(s->subs);
}

/* ---- the snapshot ---- */

static void refresh(struct ph_surface *s)
{
	if (s->refreshing)
		return;
	if (!s->connected) {
		snprintf(s->snap_err, sizeof(s->snap_err), "%s",
			 *s->dberr ? s->dberr : "database unreachable: connecting");
		s->have_snap = 0;
		answer_snapreqs(s);
		return;
	}
	s->refreshing = 1;
	if (enqueue(s, Q_SNAPSHOT, NULL) != 0) {
		s->refreshing = 0;
		snprintf(s->snap_err, sizeof(s->snap_err), "out of memory");
		s->have_snap = 0;
		answer_snapreqs(s);
	}
}

static void take_snapshot(struct ph_surface *s)
{
	s->refreshing = 0;
	s->snap_at = uv_now(s->loop);
	PQclear(s->rows);
	PQclear(s->doc);
	s->rows = s->doc = NULL;
	s->have_snap = 0;
	if (s->nres == 2 && PQresultStatus(s->res[0]) == PGRES_TUPLES_OK && PQnfields(s->res[0]) == 8 &&
	    PQresultStatus(s->res[1]) == PGRES_TUPLES_OK && PQntuples(s->res[1]) == 1 && PQnfields(s->res[1]) == 6) {
		s->rows = s->res[0];
		s->doc = s->res[1];
		s->nres = 0;
		s->have_snap = 1;
		s->snap_err[0] = '\0';
	} else {
		PGresult *bad = s->nres ? s->res[s->nres - 1] : NULL;
		char buf[400];

		for (int i = 0; i < s->nres; i++)
			if (PQresultStatus(s->res[i]) != PGRES_TUPLES_OK)
				bad = s->res[i];
		snprintf(s->snap_err, sizeof(s->snap_err), "reading projhost.projection_status(): %s [%s]",
			 ph_pg_errmsg(s->conn, bad, buf, sizeof(buf)), ph_pg_errcode(s->conn, bad));
	}
	answer_snapreqs(s);
}

/* The snapshot's rows as metrics.h rows (pointing into the result). */
static struct ph_status_row *status_rows(struct ph_surface *s, int *n)
{
	struct ph_status_row *rows;

	*n = s->have_snap ? PQntuples(s->rows) : 0;
	rows = calloc((size_t)*n + 1, sizeof(*rows));
	for (int i = 0; rows && i < *n; i++) {
		rows[i].projection = PQgetvalue(s->rows, i, 0);
		rows[i].status = PQgetvalue(s->rows, i, 1);
		rows[i].events_behind = atof(PQgetvalue(s->rows, i, 2));
		rows[i].lag_seconds = atof(PQgetvalue(s->rows, i, 3));
		rows[i].parked = atof(PQgetvalue(s->rows, i, 4));
		rows[i].stalled = strcmp(PQgetvalue(s->rows, i, 5), "t") == 0;
		rows[i].error = PQgetisnull(s->rows, i, 6) ? NULL : PQgetvalue(s->rows, i, 6);
		rows[i].eta_seconds = PQgetisnull(s->rows, i, 7) ? -1 : atof(PQgetvalue(s->rows, i, 7));
	}
	return rows;
}

static double horizon_age(struct ph_surface *s)
{
	if (!s->have_snap)
		return -1;
	return PQgetisnull(s->doc, 0, 2) ? 0 : atof(PQgetvalue(s->doc, 0, 2));
}

static void serve_metrics(struct ph_surface *s, struct ph_http_req *r)
{
	struct ph_buf b = { 0 };
	int n;
	struct ph_status_row *rows = status_rows(s, &n);

	ph_metrics_render(&b, &s->m, s->have_snap ? rows : NULL, n, horizon_age(s));
	ph_subs_metrics(s->subs, &b);
	free(rows);
	respond_buf(r, 200, "text/plain; version=0.0.4; charset=utf-8", &b);
}

static void serve_ready(struct ph_surface *s, struct ph_http_req *r)
{
	struct ph_buf b = { 0 };
	int n, bad = 0;
	struct ph_status_row *rows = status_rows(s, &n);

	if (!s->have_snap) {
		ph_buf_printf(&b, "not ready: %s\n", s->snap_err);
		bad = 1;
	}
	if (!s->loaded) {
		ph_buf_printf(&b, "not ready: the projection files are not loaded yet\n");
		bad = 1;
	} else if (s->load_errors) {
		ph_buf_printf(&b, "not ready: %d projection file%s failed to load (the log names each file and line)\n",
			      s->load_errors, s->load_errors == 1 ? "" : "s");
		bad = 1;
	}
	for (int i = 0; rows && i < n; i++) {
		const char *st = rows[i].stalled ? "stalled" : rows[i].status;

		if (strcmp(st, "failed") && strcmp(st, "stopped") && strcmp(st, "stalled"))
			continue;
		ph_buf_printf(&b, "not ready: projection %s is %s", rows[i].projection, st);
		if (rows[i].error)
			ph_buf_printf(&b, ": %s", rows[i].error);
		ph_buf_add(&b, "\n", 1);
		bad = 1;
	}
	free(rows);
	if (!bad)
		ph_buf_printf(&b, "ready\n");
	respond_buf(r, bad ? 503 : 200, "text/plain; charset=utf-8", &b);
}

static void serve_status(struct ph_surface *s, struct ph_http_req *r)
{
	if (!s->have_snap) {
		respond_error(r, 503, s->snap_err);
		return;
	}
	ph_http_respond(r, 200, "application/json", PQgetvalue(s->doc, 0, 0),
			(size_t)PQgetlength(s->doc, 0, 0));
}

static void cell_num(struct ph_buf *b, double v, const char *unit)
{
	if (v < 0)
		ph_buf_printf(b, "<td></td>");
	else
		ph_buf_printf(b, "<td class=\"n\">%.*f%s</td>", v == floor(v) ? 0 : 1, v, unit);
}

static void serve_page(struct ph_surface *s, struct ph_http_req *r)
{
	struct ph_buf b = { 0 };
	int n;
	struct ph_status_row *rows = status_rows(s, &n);

	ph_buf_printf(&b, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
		      "<meta http-equiv=\"refresh\" content=\"5\"><title>projhost</title><style>"
		      "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
		      "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}td.n{text-align:right}"
		      ".failed,.stopped,.stalled{color:#b00;font-weight:bold}.paused{color:#a60}"
		      ".err{color:#b00}</style></head><body>\n<h1>projhost</h1>\n");
	if (!s->have_snap) {
		ph_buf_add(&b, "<p class=\"err\">", 15);
		html(&b, s->snap_err);
		ph_buf_add(&b, "</p>\n", 5);
	}
	if (s->load_errors)
		ph_buf_printf(&b, "<p class=\"err\">%d projection file%s failed to load (see the log)</p>\n",
			      s->load_errors, s->load_errors == 1 ? "" : "s");
	ph_buf_printf(&b, "<table><thead><tr><th>projection</th><th>status</th><th>events behind</th>"
		      "<th>lag</th><th>ETA</th><th>parked</th><th>error</th></tr></thead><tbody>\n");
	for (int i = 0; rows && i < n; i++) {
		const char *st = rows[i].stalled ? "stalled" : rows[i].status;

		ph_buf_add(&b, "<tr><td>", 8);
		html(&b, rows[i].projection);
		ph_buf_add(&b, "</td><td class=\"", 16);
		html(&b, st);
		ph_buf_add(&b, "\">", 2);
		html(&b, st);
		ph_buf_add(&b, "</td>", 5);
		cell_num(&b, rows[i].events_behind, "");
		cell_num(&b, rows[i].lag_seconds, " s");
		cell_num(&b, rows[i].eta_seconds, " s");
		cell_num(&b, rows[i].parked, "");
		ph_buf_add(&b, "<td class=\"err\">", 16);
		html(&b, rows[i].error);
		ph_buf_add(&b, "</td></tr>\n", 11);
	}
	ph_buf_printf(&b, "</tbody></table>\n<p>horizon: ");
	if (s->have_snap && !PQgetisnull(s->doc, 0, 1)) {
		ph_buf_add(&b, "held by pid ", 12);
		html(&b, PQgetvalue(s->doc, 0, 1));
		ph_buf_add(&b, " (", 2);
		html(&b, PQgetvalue(s->doc, 0, 3));
		ph_buf_printf(&b, "), a transaction open for %.1f s, ", horizon_age(s));
		html(&b, PQgetvalue(s->doc, 0, 4));
		ph_buf_add(&b, ": <code>", 8);
		html(&b, PQgetvalue(s->doc, 0, 5));
		ph_buf_add(&b, "</code>", 7);
	} else if (s->have_snap) {
		ph_buf_printf(&b, "no open transaction holds it back");
	} else {
		ph_buf_printf(&b, "unknown");
	}
	ph_buf_printf(&b, "</p>\n<p><a href=\"/metrics\">metrics</a> &middot; <a href=\"/status\">status (JSON)</a>"
		      " &middot; <a href=\"/health/ready\">ready</a></p>\n</body></html>\n");
	free(rows);
	respond_buf(r, 200, "text/html; charset=utf-8", &b);
}

static void serve_snap(struct ph_surface *s, struct ph_http_req *r, enum route route)
{
	switch (route) {
	case R_METRICS: serve_metrics(s, r); break;
	case R_READY: serve_ready(s, r); break;
	case R_STATUS: serve_status(s, r); break;
	case R_PAGE: serve_page(s, r); break;
	}
}

static void answer_snapreqs(struct ph_surface *s)
{
	struct snapreq *list = s->snapreqs;

	s->snapreqs = NULL;
	while (list) {
		struct snapreq *n = list->next;

		serve_snap(s, list->req, list->route);
		free(list);
		list = n;
	}
}

/* ---- /wait ---- */

static void on_timer_closed(uv_handle_t *h)
{
	free(h);
}

static void waiter_answer(struct waiter *w, unsigned status, const char *result, const char *error)
{
	struct ph_surface *s = w->s;
	struct ph_buf b = { 0 };

	if (w->prev)
		w->prev->next = w->next;
	else
		s->waiters = w->next;
	if (w->next)
		w->next->prev = w->prev;
	s->nwaiters--;
	ph_buf_add(&b, "{\"projection\":", 14);
	json_str(&b, w->proj);
	ph_buf_add(&b, ",\"stream\":", 10);
	json_str(&b, w->stream);
	ph_buf_printf(&b, ",\"version\":%lld", w->version);
	if (result) {
		ph_buf_add(&b, ",\"result\":", 10);
		json_str(&b, result);
	}
	if (error) {
		ph_buf_add(&b, ",\"error\":", 9);
		json_str(&b, error);
	}
	ph_buf_add(&b, "}\n", 2);
	respond_buf(w->req, status, "application/json", &b);
	uv_close((uv_handle_t *)w->timer, on_timer_closed);
	free(w->proj);
	free(w->stream);
	free(w);
}

static void check(struct waiter *w)
{
	struct ph_surface *s = w->s;

	if (w->queued) {
		w->again = 1;
		return;
	}
	if (!s->connected) {
		/* answered when the timeout comes; then the database's absence */
		if (w->timed_out)
			waiter_answer(w, 503, NULL, *s->dberr ? s->dberr : "database unreachable");
		return;
	}
	w->queued = 1;
	if (enqueue(s, Q_CHECK, w) != 0) {
		w->queued = 0;
		if (w->timed_out)
			waiter_answer(w, 500, NULL, "out of memory");
	}
}

static void checked(struct ph_surface *s, struct waiter *w)
{
	PGresult *r = s->nres ? s->res[s->nres - 1] : NULL;

	w->queued = 0;
	if (r && PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1) {
		const char *v = PQgetvalue(r, 0, 0);

		if (strcmp(v, "pending") != 0) {
			waiter_answer(w, 200, v, NULL);
			return;
		}
		if (w->again) {
			w->again = 0;
			check(w);
		} else if (w->timed_out) {
			waiter_answer(w, 504, "pending", NULL);
		}
		return;
	}
	{
		const char *code = ph_pg_errcode(s->conn, r);
		char buf[400];

		ph_pg_errmsg(s->conn, r, buf, sizeof(buf));
		if (strcmp(code, "42704") == 0 || strcmp(code, "P0002") == 0 || strcmp(code, "22023") == 0)
			waiter_answer(w, 404, NULL, buf);
		else
			waiter_answer(w, 500, NULL, buf);
	}
}

static void query_done(struct ph_surface *s)
{
	struct query *q = s->qhead;

	s->sent = 0;
	s->qhead = q->next;
	if (!s->qhead)
		s->qtail = NULL;
	if (q->kind == Q_SNAPSHOT)
		take_snapshot(s);
	else if (q->kind == Q_CHECK)
		checked(s, q->w);
	else if (q->kind == Q_CALL) {
		/* the results are the caller's until it returns: what it queues
		 * meanwhile may lose the connection, which clears s->res */
		PGresult *res[2];
		int nres = s->nres;

		memcpy(res, s->res, sizeof(res));
		s->nres = 0;
		call_done(q, nres ? res[nres - 1] : NULL);
		for (int i = 0; i < nres; i++)
			PQclear(res[i]);
		q = NULL;
	} else if (s->nres && PQresultStatus(s->res[0]) != PGRES_TUPLES_OK) {
		char buf[400];

		ph_log(PH_WARN, "host", "http status connection: %s: %s", SETUP_SQL,
		       ph_pg_errmsg(s->conn, s->res[0], buf, sizeof(buf)));
	}
	free(q);
	for (int i = 0; i < s->nres; i++)
		PQclear(s->res[i]);
	s->nres = 0;
	pump(s);
}

static void on_wait_timeout(uv_timer_t *t)
{
	struct waiter *w = t->data;

	w->timed_out = 1;
	check(w);
}

/* A whole number in [lo, hi], digits only (no sign, exponent, spaces). */
static int parse_int(const char *v, long long lo, long long hi, long long *out)
{
	char *end;
	long long n;

	if (!v || !*v || strspn(v, "0123456789") != strlen(v) || strlen(v) > 18)
		return -1;
	errno = 0;
	n = strtoll(v, &end, 10);
	if (errno || *end || n < lo || n > hi)
		return -1;
	*out = n;
	return 0;
}

static void serve_wait(struct ph_surface *s, struct ph_http_req *r)
{
	const char *proj = ph_http_arg(r, "projection"), *stream = ph_http_arg(r, "stream");
	const char *tv = ph_http_arg(r, "timeout_ms");
	long long version, timeout = PH_WAIT_DEFAULT_MS;
	struct waiter *w;

	if (!proj || !*proj || !stream || !*stream) {
		respond_error(r, 400, "projection and stream are required");
		return;
	}
	if (parse_int(ph_http_arg(r, "version"), 1, 999999999999999999LL, &version) != 0) {
		respond_error(r, 400, "version must be a whole number from 1");
		return;
	}
	if (tv && parse_int(tv, 0, PH_WAIT_MAX_MS, &timeout) != 0) {
		char msg[128];

		snprintf(msg, sizeof(msg), "timeout_ms must be a whole number from 0 to %d", PH_WAIT_MAX_MS);
		respond_error(r, 400, msg);
		return;
	}
	if (!s->known(s->arg, proj)) {
		struct ph_buf b = { 0 };

		ph_buf_add(&b, "unknown projection ", 19);
		ph_buf_add(&b, proj, strlen(proj));
		ph_buf_add(&b, " (not served by this host)", 26);
		respond_error(r, 404, b.failed ? "unknown projection" : b.s);
		ph_buf_free(&b);
		return;
	}
	if (s->nwaiters >= (int)ph_http_share(r, PH_WAIT_MAX_WAITERS)) {
		respond_error(r, 503, "too many /wait requests at once; try again");
		return;
	}
	w = calloc(1, sizeof(*w));
	if (!w || !(w->proj = strdup(proj)) || !(w->stream = strdup(stream)) ||
	    !(w->timer = calloc(1, sizeof(*w->timer)))) {
		if (w) {
			free(w->proj);
			free(w->stream);
		}
		free(w);
		ph_http_respond(r, 500, "text/plain; charset=utf-8", "out of memory\n", 14);
		return;
	}
	w->s = s;
	w->req = r;
	w->version = version;
	uv_timer_init(s->loop, w->timer);
	w->timer->data = w;
	w->next = s->waiters;
	if (s->waiters)
		s->waiters->prev = w;
	s->waiters = w;
	s->nwaiters++;
	uv_timer_start(w->timer, on_wait_timeout, (uint64_t)timeout, 0);
	check(w);	/* at arrival: maybe applied already */
}

/* ---- routes ---- */

static void on_request(struct ph_http_req *r, void *arg)
{
	struct ph_surface *s = arg;
	const char *path = ph_http_path(r);
	enum route route;
	struct snapreq *q;

	if (strcmp(path, "/health/live") == 0) {
		ph_http_respond(r, 200, "text/plain; charset=utf-8", "live\n", 5);
		return;
	}
	if (strcmp(path, "/wait") == 0) {
		serve_wait(s, r);
		return;
	}
	if (strcmp(path, "/subscribe") == 0) {
		ph_subs_serve(s->subs, r);
		return;
	}
	if (strcmp(path, "/metrics") == 0)
		route = R_METRICS;
	else if (strcmp(path, "/health/ready") == 0)
		route = R_READY;
	else if (strcmp(path, "/status") == 0)
		route = R_STATUS;
	else if (strcmp(path, "/") == 0)
		route = R_PAGE;
	else {
		ph_http_respond(r, 404, "text/plain; charset=utf-8", "not found\n", 10);
		return;
	}
	if (s->have_snap && uv_now(s->loop) - s->snap_at < PH_SURFACE_FRESH_MS && !s->refreshing) {
		serve_snap(s, r, route);
		return;
	}
	q = calloc(1, sizeof(*q));
	if (!q) {
		ph_http_respond(r, 500, "text/plain; charset=utf-8", "out of memory\n", 14);
		return;
	}
	q->req = r;
	q->route = route;
	q->next = s->snapreqs;
	s->snapreqs = q;
	refresh(s);
}

/* ---- the master's side ---- */

struct ph_surface *ph_surface_start(uv_loop_t *loop, const char *addr, const char *dsn,
				    double stall_after, int (*known)(void *arg, const char *name), void *arg)
{
	struct ph_surface *s = calloc(1, sizeof(*s));
	char err[256];

	if (!s || !(s->dsn = strdup(dsn)) || !(s->retry = calloc(1, sizeof(*s->retry)))) {
		ph_log(PH_ERROR, "host", "cannot serve HTTP: out of memory");
		if (s)
			free(s->dsn);
		free(s);
		return NULL;
	}
	s->loop = loop;
	snprintf(s->stall_after, sizeof(s->stall_after), "%.17g", stall_after);
	s->known = known;
	s->arg = arg;
	s->subs = ph_subs_new(loop, s);
	s->http = s->subs ? ph_http_start(loop, addr, on_request, s, err, sizeof(err)) : NULL;
	if (!s->http) {
		ph_log(PH_ERROR, "host", "cannot serve HTTP: %s", s->subs ? err : "out of memory");
		ph_subs_free(s->subs);
		free(s->retry);
		free(s->dsn);
		free(s);
		return NULL;
	}
	uv_timer_init(loop, s->retry);
	s->retry->data = s;
	ph_log(PH_INFO, "host", "serving HTTP on http://%s/ (/metrics /health/live /health/ready /status /wait /subscribe)",
	       ph_http_address(s->http));
	db_connect(s);
	return s;
}

struct ph_metrics *ph_surface_metrics(struct ph_surface *s)
{
	return &s->m;
}

void ph_surface_loaded(struct ph_surface *s, int errors)
{
	s->loaded = 1;
	s->load_errors = errors;
}

void ph_surface_batch_done(struct ph_surface *s, const char *proj)
{
	for (struct waiter *w = s->waiters; w; w = w->next)
		if (strcmp(w->proj, proj) == 0)
			check(w);
}

void ph_surface_recheck(struct ph_surface *s)
{
	for (struct waiter *w = s->waiters; w; w = w->next)
		check(w);
}

void ph_surface_stop(struct ph_surface *s)
{
	if (!s)
		return;
	/* nothing more is read: every answer still owed is given now */
	drop_poll(s);
	for (struct query *q = s->qhead; q; q = q->next)
		if (q->kind == Q_CHECK)
			q->w->queued = 0;
	s->refreshing = 0;
	snprintf(s->snap_err, sizeof(s->snap_err), "shutting down");
	s->have_snap = 0;
	answer_snapreqs(s);
	while (s->waiters)
		waiter_answer(s->waiters, 503, NULL, "shutting down");
	ph_subs_shutdown(s->subs);
	ph_http_stop(s->http);
	/* the subscribers are gone: their reads end with no result */
	while (s->qhead) {
		struct query *q = s->qhead;

		s->qhead = q->next;
		if (q->kind == Q_CALL)
			call_done(q, NULL);
		else
			free(q);
	}
	s->qtail = NULL;
	ph_subs_free(s->subs);
	for (int i = 0; i < s->nres; i++)
		PQclear(s->res[i]);
	PQclear(s->rows);
	PQclear(s->doc);
	PQfinish(s->conn);
	uv_close((uv_handle_t *)s->retry, on_timer_closed);
	ph_metrics_free(&s->m);
	free(s->dsn);
	free(s);
}
