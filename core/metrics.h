/*
 * metrics.h - the figures the master exports, and their Prometheus text
 * rendering (exposition format 0.0.4) for GET /metrics.
 *
 * Two sources: counters of what the workers report (events applied and
 * batch durations from "done" answers, handler errors by action from
 * "fails" lines, see proto.h; worker restarts and reloads from the master
 * itself), kept here since the process started; and a snapshot of
 * projhost.projection_status() read by surface.c (lag, parked, status).
 */
#ifndef PH_METRICS_H
#define PH_METRICS_H

#include <stddef.h>
#include <stdint.h>

/** struct ph_buf - a growable text buffer; failed is set out of memory. */
struct ph_buf {
	char *s;
	size_t len, cap;
	int failed;
};

/** ph_buf_add() - append @n bytes of @s. */
void ph_buf_add(struct ph_buf *b, const char *s, size_t n);

/** ph_buf_printf() - append formatted text. */
void ph_buf_printf(struct ph_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/** ph_buf_free() - release the buffer. */
void ph_buf_free(struct ph_buf *b);

/* The error actions (worker/failure.lua), in the order they are exported. */
#define PH_ACTIONS 6
extern const char *const ph_metrics_actions[PH_ACTIONS];

/* Upper bounds of the batch duration histogram's buckets, seconds. */
#define PH_BUCKETS 12

struct ph_mproj {
	char *name;
	uint64_t applied;
	uint64_t errors[PH_ACTIONS];
	uint64_t timers_fired;
};

/** struct ph_metrics - counters since the master started. */
struct ph_metrics {
	struct ph_mproj *projs;
	int n, cap;
	uint64_t buckets[PH_BUCKETS];	/* not cumulative; rendered cumulative */
	uint64_t batches;
	double batch_seconds;
	uint64_t restarts;
	uint64_t reloads_ok, reloads_error;
};

/** struct ph_status_row - one row of projhost.projection_status(). */
struct ph_status_row {
	const char *projection, *status, *error;
	double events_behind, lag_seconds, parked, eta_seconds;	/* eta < 0: none */
	int stalled;
};

/* The statuses of projection_status(), each a projhost_projection_up series. */
#define PH_STATUSES 6
extern const char *const ph_metrics_statuses[PH_STATUSES];

/** ph_metrics_batch() - a batch of @proj applied @events in @seconds. */
void ph_metrics_batch(struct ph_metrics *m, const char *proj, uint64_t events, double seconds);

/** ph_metrics_error() - @n handler errors of @proj got @action. */
void ph_metrics_error(struct ph_metrics *m, const char *proj, const char *action, uint64_t n);

/** ph_metrics_timers() - batches of @proj fired @n timers ("fired" lines). */
void ph_metrics_timers(struct ph_metrics *m, const char *proj, uint64_t n);

/** ph_metrics_free() - release @m's projections. */
void ph_metrics_free(struct ph_metrics *m);

/**
 * ph_metrics_render() - the whole /metrics document into @out: @m, then
 * the @nrows rows of the snapshot (@rows NULL: no snapshot) and the
 * horizon's age (seconds; < 0: unknown, not exported).
 */
void ph_metrics_render(struct ph_buf *out, const struct ph_metrics *m, const struct ph_status_row *rows, int nrows,
		       double horizon_age);

/** ph_metrics_label() - append @s escaped as a label value (\\, \", \n). */
void ph_metrics_label(struct ph_buf *b, const char *s);

#endif
