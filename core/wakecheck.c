/*
 * wakecheck.c - see wakecheck.h. The rules of the epochs and locks live in
 * projhost.wake_check() and its comment in lua/projhost/schema.lua; this
 * file only drives the calls from the loop without blocking it.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "pg.h"
#include "wakecheck.h"

/* Backoff between looks at busy epochs: a skipper's commit takes about a
 * WAL flush, so the first looks come soon; never more than this apart. */
#define PH_WAKECHECK_MAX_MS 50

static void send_check(struct ph_wakecheck *wc, int flip);

static void on_timer(uv_timer_t *t)
{
	struct ph_wakecheck *wc = t->data;

	wc->waiting = 0;
	if (wc->conn && !wc->busy)
		send_check(wc, 0);
	else if (wc->conn && wc->busy && PQflush(wc->conn) == 1) {
		wc->waiting = 1;
		uv_timer_start(&wc->timer, on_timer, 1, 0);
	}
}

void ph_wakecheck_init(struct ph_wakecheck *wc, uv_loop_t *loop, void (*wake_all)(void *), void *arg)
{
	memset(wc, 0, sizeof(*wc));
	uv_timer_init(loop, &wc->timer);
	wc->timer.data = wc;
	wc->wake_all = wake_all;
	wc->arg = arg;
	wc->next_from = wc->base = -1;
}

void ph_wakecheck_attach(struct ph_wakecheck *wc, PGconn *conn)
{
	wc->conn = conn;
	wc->busy = wc->got = wc->again = 0;
	wc->next_from = wc->base = -1;
	if (wc->waiting)
		uv_timer_stop(&wc->timer);
	wc->waiting = 0;
}

static void send_check(struct ph_wakecheck *wc, int flip)
{
	char from[24], to[24];
	const char *params[2] = { NULL, NULL };
	int64_t f = flip ? wc->next_from : wc->from;

	if (f >= 0) {
		snprintf(from, sizeof(from), "%" PRId64, f);
		params[0] = from;
	}
	if (!flip) {
		snprintf(to, sizeof(to), "%" PRId64, wc->to);
		params[1] = to;
	}
	if (!PQsendQueryParams(wc->conn, "SELECT epoch, skips_before, busy_from, skips "
			       "FROM projhost.wake_check($1::bigint, $2::bigint)",
			       2, NULL, params, NULL, NULL, 0)) {
		char buf[256];

		/* the connection is going: its owner finds out and reconnects */
		ph_log(PH_WARN, "host", "cannot check for appends that skipped NOTIFY: %s",
		       ph_pg_errmsg(wc->conn, NULL, buf, sizeof(buf)));
		wc->wake_all(wc->arg);
		return;
	}
	wc->busy = 1;
	wc->flip = flip;
	wc->got = wc->failed = 0;
	if (flip)
		wc->again = 0;
	if (PQflush(wc->conn) == 1 && !wc->waiting) {
		wc->waiting = 1;
		uv_timer_start(&wc->timer, on_timer, 1, 0);
	}
}

void ph_wakecheck_notified(struct ph_wakecheck *wc)
{
	if (!wc->conn)
		return;
	if (wc->busy || wc->waiting)
		wc->again = 1;
	else
		send_check(wc, 1);
}

static void take_row(struct ph_wakecheck *wc, PGresult *r)
{
	if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1 || PQnfields(r) != 4) {
		if (!wc->logged) {
			char buf[256];

			ph_log(PH_WARN, "host", "checking for appends that skipped NOTIFY: %s; waking every projection instead",
			       ph_pg_errmsg(wc->conn, r, buf, sizeof(buf)));
		}
		wc->logged = wc->failed = 1;
		return;
	}
	for (int i = 0; i < 4; i++)
		wc->row[i] = PQgetisnull(r, 0, i) ? -1 : strtoll(PQgetvalue(r, 0, i), NULL, 10);
	wc->got = 1;
	wc->logged = 0;
}

/* The whole answer is in: act on it. */
static void answered(struct ph_wakecheck *wc)
{
	wc->busy = 0;
	if (wc->failed || !wc->got) {
		/* cannot tell: wake everything (costs reads, loses nothing) */
		wc->wake_all(wc->arg);
		wc->next_from = wc->base = -1;
		return;
	}
	if (wc->flip) {
		wc->cycle_base = wc->base;
		wc->base = wc->row[1];
		wc->next_from = wc->row[0];
		wc->to = wc->row[0] - 1;
		wc->tries = 0;
	}
	if (wc->row[2] >= 0) {
		/* an epoch's lock is still held: a skipper is committing */
		unsigned ms = 1u << (wc->tries < 6 ? wc->tries : 6);

		wc->from = wc->row[2];
		wc->tries++;
		wc->waiting = 1;
		uv_timer_start(&wc->timer, on_timer, ms < PH_WAKECHECK_MAX_MS ? ms : PH_WAKECHECK_MAX_MS, 0);
		return;
	}
	if (wc->cycle_base < 0 || wc->row[3] != wc->cycle_base)
		wc->wake_all(wc->arg);
	if (wc->again)
		send_check(wc, 1);
}

void ph_wakecheck_input(struct ph_wakecheck *wc)
{
	if (!wc->conn || !wc->busy)
		return;
	while (!PQisBusy(wc->conn)) {
		PGresult *r = PQgetResult(wc->conn);

		if (!r) {
			answered(wc);
			return;
		}
		if (!wc->got && !wc->failed)
			take_row(wc, r);
		PQclear(r);
	}
}
