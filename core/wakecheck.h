/*
 * wakecheck.h - wake every projection once the appends that skipped their
 * NOTIFY have committed.
 *
 * At most one committing append notifies at a time; the others skip and
 * hold the shared lock of the current epoch until their commit ends (see
 * "One NOTIFY per moment" in lua/projhost/schema.lua). After notifications
 * the host starts a new epoch on its LISTEN connection with
 * projhost.wake_check() and polls the retired epochs' locks, with backoff,
 * until each was free once; then, if anyone skipped since its previous
 * epoch, it wakes every projection, since the skippers' streams were never
 * named. One check runs at a time; notifications during it start another
 * when it ends.
 */
#ifndef PH_WAKECHECK_H
#define PH_WAKECHECK_H

#include <stdint.h>
#include <libpq-fe.h>
#include <uv.h>

struct ph_wakecheck {
	PGconn *conn;		/* the LISTEN connection; NULL while there is none */
	uv_timer_t timer;	/* retry of a check whose epochs were busy */
	void (*wake_all)(void *arg);
	void *arg;
	int busy;		/* a wake_check() is in flight */
	int flip;		/* ...and it starts a new epoch */
	int waiting;		/* the timer is armed */
	int again;		/* notifications came since this check began */
	int got;		/* its row was read; NULL result still to come */
	int failed;		/* its result was an error (logged once per streak) */
	int logged;
	unsigned tries;
	int64_t row[4];		/* epoch, skips_before, busy_from (-1: NULL), skips */
	int64_t next_from;	/* the epoch this host started last (-1: none yet) */
	int64_t from, to;	/* retired epochs still to see free */
	int64_t base;		/* skip count before this host's previous epoch (-1: unknown) */
	int64_t cycle_base;	/* the base the running check compares with */
};

/**
 * ph_wakecheck_init() - set up @wc on @loop; @wake_all(@arg) wakes everything.
 */
void ph_wakecheck_init(struct ph_wakecheck *wc, uv_loop_t *loop, void (*wake_all)(void *), void *arg);

/**
 * ph_wakecheck_attach() - use @conn (a nonblocking connection that LISTENs),
 * or NULL when it was lost: a check in flight is forgotten, and the epochs
 * start over with the next connection (whose owner wakes everything anyway).
 */
void ph_wakecheck_attach(struct ph_wakecheck *wc, PGconn *conn);

/**
 * ph_wakecheck_notified() - notifications arrived: start a check, or run
 * another after the current one.
 */
void ph_wakecheck_notified(struct ph_wakecheck *wc);

/**
 * ph_wakecheck_input() - call after PQconsumeInput() on the connection:
 * takes the check's answer when all of it is there.
 */
void ph_wakecheck_input(struct ph_wakecheck *wc);

#endif
