/*
 * surface.h - the master's HTTP surface (`projhost run --http ADDR`): the
 * routes, the figures behind them and the master-owned PostgreSQL
 * connection they are read on, never blocking the loop.
 *
 *   GET /metrics       Prometheus text (metrics.h)
 *   GET /health/live   200 while the loop answers
 *   GET /health/ready  200, or 503 naming each check that fails: database
 *                      unreachable, files not loaded (or some failed to),
 *                      a projection failed, stopped or stalled
 *   GET /status        projhost.status_json(), unchanged (application/json)
 *   GET /              an HTML page of the same, refreshing itself
 *   GET /wait?projection=P&stream=S&version=V[&timeout_ms=T]
 *                      answered once projhost.applied(P, S, V) is not
 *                      'pending' - checked at arrival, after each batch of P
 *                      a worker reports done, and at the timeout: 200
 *                      {"result":"applied|parked|skipped",...}; 504
 *                      {"result":"pending",...} at the timeout; 400 bad
 *                      parameters; 404 unknown projection or no such event;
 *                      503 database unreachable at the timeout, or
 *                      PH_WAIT_MAX_WAITERS already waiting
 *   GET /subscribe?... Server-Sent Events (subscribe.h)
 *
 * The database figures (projection_status(), status_json()) are one
 * snapshot, read on demand and kept PH_SURFACE_FRESH_MS: a scrape storm
 * costs one query every that often.
 */
#ifndef PH_SURFACE_H
#define PH_SURFACE_H

#include <stdint.h>
#include <libpq-fe.h>
#include <uv.h>

#include "http.h"
#include "metrics.h"

#define PH_SURFACE_FRESH_MS 2000
/* /wait: timeout_ms when none is given, and the most it may be */
#define PH_WAIT_DEFAULT_MS 30000
#define PH_WAIT_MAX_MS 600000
/* /wait requests held at once; more are answered 503 at once, so waiters
 * (which hold their connections for up to PH_WAIT_MAX_MS) never take every
 * connection and /metrics and /health stay reachable */
#define PH_WAIT_MAX_WAITERS 256

struct ph_surface;

/**
 * ph_surface_start() - serve on @addr, reading the database at @dsn;
 * @known(@arg, name) says whether this host serves projection @name;
 * @stall_after: seconds (PROJHOST_STALL_AFTER) for projhost.projection_status().
 * Logs "serving HTTP on http://ADDR/" or why not.
 * Return: the surface, or NULL (it could not listen).
 */
struct ph_surface *ph_surface_start(uv_loop_t *loop, const char *addr, const char *dsn,
				    double stall_after, int (*known)(void *arg, const char *name), void *arg);

/** ph_surface_metrics() - the counters the master feeds (metrics.h). */
struct ph_metrics *ph_surface_metrics(struct ph_surface *s);

/** ph_surface_loaded() - the files were (re)loaded; @errors of them failed. */
void ph_surface_loaded(struct ph_surface *s, int errors);

/** ph_surface_batch_done() - a worker answered a batch of @proj: re-check its waiters. */
void ph_surface_batch_done(struct ph_surface *s, const char *proj);

/**
 * ph_surface_recheck() - check every waiter again: the fallback poll's
 * backstop for batches that another instance committed (this host's own
 * batches answer their waiters through ph_surface_batch_done()).
 */
void ph_surface_recheck(struct ph_surface *s);

/**
 * ph_surface_query() - run @sql with @n text @params on the surface's
 * connection, after what is queued; @cb(@arg, result) gets its last result
 * (NULL: the connection was lost or the surface stops), which it must not
 * clear. Return: 0, or -1 (not connected, or out of memory: @cb is not called).
 */
int ph_surface_query(struct ph_surface *s, const char *sql, int n, const char *const *params,
		     void (*cb)(void *arg, PGresult *res), void *arg);

/**
 * ph_surface_wake() - new events may have been committed (a NOTIFY, a
 * wake-up of every projection, the fallback poll): subscribers read them.
 */
void ph_surface_wake(struct ph_surface *s);

/** ph_surface_stop() - answer what waits (503), close everything, free @s. */
void ph_surface_stop(struct ph_surface *s);

#endif
