/*
 * metrics.c - see metrics.h. Names follow the Prometheus conventions:
 * projhost_ prefix, base units (seconds), _total for counters, one HELP
 * and TYPE per family.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"

const char *const ph_metrics_actions[PH_ACTIONS] = { "retry", "skip", "park", "hold", "fail", "stop" };
const char *const ph_metrics_statuses[PH_STATUSES] = { "running", "paused", "failed", "stopped", "stalled",
							"rebuilding" };
static const double bucket_le[PH_BUCKETS] = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 };

static int grow(struct ph_buf *b, size_t more)
{
	size_t cap = b->cap ? b->cap : 4096;
	char *s;

	if (b->failed)
		return -1;
	while (cap < b->len + more + 1)
		cap *= 2;
	if (cap == b->cap)
		return 0;
	s = realloc(b->s, cap);
	if (!s) {
		b->failed = 1;
		return -1;
	}
	b->s = s;
	b->cap = cap;
	return 0;
}

void ph_buf_add(struct ph_buf *b, const char *s, size_t n)
{
	if (grow(b, n) != 0)
		return;
	memcpy(b->s + b->len, s, n);
	b->len += n;
	b->s[b->len] = '\0';
}

void ph_buf_printf(struct ph_buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0 || grow(b, (size_t)n) != 0)
		return;
	va_start(ap, fmt);
	vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

void ph_buf_free(struct ph_buf *b)
{
	free(b->s);
	memset(b, 0, sizeof(*b));
}

static struct ph_mproj *proj_of(struct ph_metrics *m, const char *name)
{
	for (int i = 0; i < m->n; i++)
		if (strcmp(m->projs[i].name, name) == 0)
			return &m->projs[i];
	if (m->n == m->cap) {
		int cap = m->cap ? m->cap * 2 : 16;
		struct ph_mproj *p = realloc(m->projs, (size_t)cap * sizeof(*p));

		if (!p)
			return NULL;
		m->projs = p;
		m->cap = cap;
	}
	memset(&m->projs[m->n], 0, sizeof(m->projs[m->n]));
	if (!(m->projs[m->n].name = strdup(name)))
		return NULL;
	return &m->projs[m->n++];
}

void ph_metrics_batch(struct ph_metrics *m, const char *proj, uint64_t events, double seconds)
{
	struct ph_mproj *p = proj_of(m, proj);
	int i = 0;

	if (p)
		p->applied += events;
	if (!(seconds >= 0))
		seconds = 0;
	while (i < PH_BUCKETS && seconds > bucket_le[i])
		i++;
	if (i < PH_BUCKETS)
		m->buckets[i]++;
	m->batches++;
	m->batch_seconds += seconds;
}

void ph_metrics_error(struct ph_metrics *m, const char *proj, const char *action, uint64_t n)
{
	struct ph_mproj *p;

	for (int a = 0; a < PH_ACTIONS; a++)
		if (strcmp(action, ph_metrics_actions[a]) == 0) {
			if ((p = proj_of(m, proj)))
				p->errors[a] += n;
			return;
		}
}

void ph_metrics_timers(struct ph_metrics *m, const char *proj, uint64_t n)
{
	struct ph_mproj *p = proj_of(m, proj);

	if (p)
		p->timers_fired += n;
}

void ph_metrics_free(struct ph_metrics *m)
{
	for (int i = 0; i < m->n; i++)
		free(m->projs[i].name);
	free(m->projs);
	m->projs = NULL;
	m->n = m->cap = 0;
}

void ph_metrics_label(struct ph_buf *b, const char *s)
{
	for (const char *p = s; *p; p++) {
		if (*p == '\\')
			ph_buf_add(b, "\\\\", sizeof("\\\\") - 1);
		else if (*p == '"')
			ph_buf_add(b, "\\\"", sizeof("\\\"") - 1);
		else if (*p == '\n')
			ph_buf_add(b, "\\n", sizeof("\\n") - 1);
		else
			ph_buf_add(b, p, 1);
	}
}

static void family(struct ph_buf *b, const char *name, const char *type, const char *help)
{
	ph_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A sample value: integers as such, NaN/Inf as the format spells them. */
static void value(struct ph_buf *b, double v)
{
	if (isnan(v))
		ph_buf_add(b, " NaN\n", sizeof(" NaN\n") - 1);
	else if (isinf(v))
		ph_buf_printf(b, " %sInf\n", v > 0 ? "+" : "-");
	else if (v == floor(v) && fabs(v) < 1e15)
		ph_buf_printf(b, " %.0f\n", v);
	else
		ph_buf_printf(b, " %.17g\n", v);
}

static void sample1(struct ph_buf *b, const char *name, const char *label, const char *lv, double v)
{
	ph_buf_add(b, name, strlen(name));
	if (label) {
		ph_buf_printf(b, "{%s=\"", label);
		ph_metrics_label(b, lv);
		ph_buf_add(b, "\"}", sizeof("\"}") - 1);
	}
	value(b, v);
}

enum field { F_BEHIND, F_LAG, F_PARKED };

/* A per-projection gauge from the snapshot. */
static void gauge_rows(struct ph_buf *b, const char *name, const char *help, const struct ph_status_row *rows,
		       int nrows, enum field f)
{
	family(b, name, "gauge", help);
	for (int i = 0; i < nrows; i++)
		sample1(b, name, "projection", rows[i].projection,
			f == F_BEHIND ? rows[i].events_behind : f == F_LAG ? rows[i].lag_seconds : rows[i].parked);
}

void ph_metrics_render(struct ph_buf *out, const struct ph_metrics *m, const struct ph_status_row *rows, int nrows,
		       double horizon_age)
{
	uint64_t cum = 0;

	if (rows) {
		gauge_rows(out, "projhost_events_behind", "Events of the projection's source not yet applied.", rows,
			   nrows, F_BEHIND);
		gauge_rows(out, "projhost_lag_seconds", "Age of the oldest event not yet applied (0 when caught up).",
			   rows, nrows, F_LAG);
		gauge_rows(out, "projhost_parked_events", "Events parked in projhost.parked.", rows, nrows,
			   F_PARKED);
		family(out, "projhost_projection_up", "gauge", "1 for the projection's current status, 0 for the others.");
		for (int i = 0; i < nrows; i++)
			for (int s = 0; s < PH_STATUSES; s++) {
				ph_buf_add(out, "projhost_projection_up{projection=\"", sizeof("projhost_projection_up{projection=\"") - 1);
				ph_metrics_label(out, rows[i].projection);
				ph_buf_printf(out, "\",status=\"%s\"} %d\n", ph_metrics_statuses[s],
					      strcmp(rows[i].status, ph_metrics_statuses[s]) == 0);
			}
	}
	family(out, "projhost_events_applied_total", "counter", "Events applied by this host's workers.");
	for (int i = 0; i < m->n; i++)
		sample1(out, "projhost_events_applied_total", "projection", m->projs[i].name, (double)m->projs[i].applied);
	family(out, "projhost_handler_errors_total", "counter", "Failed events, by the error action they got.");
	for (int i = 0; i < m->n; i++)
		for (int a = 0; a < PH_ACTIONS; a++) {
			ph_buf_add(out, "projhost_handler_errors_total{projection=\"", sizeof("projhost_handler_errors_total{projection=\"") - 1);
			ph_metrics_label(out, m->projs[i].name);
			ph_buf_printf(out, "\",action=\"%s\"} %llu\n", ph_metrics_actions[a],
				      (unsigned long long)m->projs[i].errors[a]);
		}
	family(out, "projhost_timers_fired_total", "counter", "Timers (ctx:schedule, every) fired by this host's workers.");
	for (int i = 0; i < m->n; i++)
		sample1(out, "projhost_timers_fired_total", "projection", m->projs[i].name, (double)m->projs[i].timers_fired);
	family(out, "projhost_batch_duration_seconds", "histogram", "Time a worker took for a batch (job to answer).");
	for (int i = 0; i < PH_BUCKETS; i++) {
		cum += m->buckets[i];
		ph_buf_printf(out, "projhost_batch_duration_seconds_bucket{le=\"%g\"} %llu\n", bucket_le[i],
			      (unsigned long long)cum);
	}
	ph_buf_printf(out, "projhost_batch_duration_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)m->batches);
	ph_buf_add(out, "projhost_batch_duration_seconds_sum", sizeof("projhost_batch_duration_seconds_sum") - 1);
	value(out, m->batch_seconds);
	ph_buf_printf(out, "projhost_batch_duration_seconds_count %llu\n", (unsigned long long)m->batches);
	family(out, "projhost_worker_restarts_total", "counter", "Workers that died unasked and were replaced.");
	ph_buf_printf(out, "projhost_worker_restarts_total %llu\n", (unsigned long long)m->restarts);
	family(out, "projhost_reloads_total", "counter", "Reloads of the projection files, by result.");
	ph_buf_printf(out, "projhost_reloads_total{result=\"ok\"} %llu\n", (unsigned long long)m->reloads_ok);
	ph_buf_printf(out, "projhost_reloads_total{result=\"error\"} %llu\n", (unsigned long long)m->reloads_error);
	if (horizon_age >= 0) {
		family(out, "projhost_horizon_age_seconds", "gauge",
		       "Age of the oldest open transaction holding the xmin horizon back (0: none).");
		sample1(out, "projhost_horizon_age_seconds", NULL, NULL, horizon_age);
	}
}
