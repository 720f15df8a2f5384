/*
 * schedule.c - see schedule.h.
 */
#include <string.h>

#include "schedule.h"

struct ph_next ph_sched_done(const char *status, double delay, unsigned *attempts, unsigned *holds, uint64_t now)
{
	struct ph_next n = { UINT64_MAX, 0, 0 };

	if (strcmp(status, "more") == 0) {
		n.at = now;
		*attempts = *holds = 0;
	} else if (strcmp(status, "idle") == 0) {
		n.settled = 1;
		*attempts = *holds = 0;
	} else if (strcmp(status, "held") == 0) {
		/* Something below the horizon is still running; it may never
		 * NOTIFY (an unrelated transaction), so look again soon,
		 * backing off from a few ms to a second. */
		unsigned h = *holds < 9 ? *holds : 9;

		(*holds)++;
		n.at = now + (2u << h);
	} else if (strcmp(status, "locked") == 0) {
		/* Another worker or instance holds it; when it commits we
		 * must look again or that wake-up is lost. */
		n.at = now + 500;
		n.hard = 1;
	} else if (strcmp(status, "retry") == 0 || strcmp(status, "dberror") == 0) {
		(*attempts)++;
		n.at = now + (uint64_t)(delay > 0 ? delay * 1000 : 0);
		n.hard = 1;
	} else {
		/* failed, stopped, paused, done (a handler finished the
		 * partition: ctx:done), holding (a held event waits in the
		 * dead letters: on_error "hold"): wait for an operator's
		 * wake-up. Not "held": that one is the horizon's, above. */
		n.settled = 1;
	}
	return n;
}

int ph_sched_reads(char kind, const char *value, const char *stream)
{
	size_t n;

	switch (kind) {
	case 'a':
		return 1;
	case 's':
		return strcmp(value, stream) == 0;
	case 'c':
		n = strcspn(stream, "-");
		return strlen(value) == n && strncmp(value, stream, n) == 0;
	}
	return 0;
}

int ph_sched_find_waits(size_t nparts, int new_walk, uint64_t *round_wait, uint64_t now)
{
	/* back-pressure before the query, not after it: while enough of its
	 * partitions wait, the workers process them instead of listing; a
	 * new walk from the first stream waits for its partitions to drain,
	 * or it would list again what is queued */
	int wait_round = new_walk && nparts > 0;

	if (wait_round && !*round_wait)
		*round_wait = now ? now : 1;
	if (nparts > PH_FIND_AHEAD || (wait_round && now < *round_wait + PH_FIND_WAIT_MS))
		return 1;
	*round_wait = 0;
	return 0;
}

struct ph_next ph_sched_after_find(const char *status, unsigned long nfound, size_t nparts,
				   int window_next, uint64_t now, int *plain)
{
	struct ph_next n = { now + 500, 1, 0 };
	int more = strcmp(status, "more") == 0;

	*plain = 0;
	if (more && nparts > PH_FIND_AHEAD) {
		/* back-pressure: the next page once its partitions have
		 * drained (memory stays bounded, and workers process
		 * partitions instead of listing ones already queued) */
		n.at = now + 50;
	} else if (more) {
		*plain = 1;
	} else if (nfound) {
		/* look again once these are done: the projection has caught
		 * up when a look finds nothing behind (a window sooner if
		 * woken: it lists only new events' streams) */
		n.hard = !window_next;
	} else {
		*plain = 1;
	}
	return n;
}

enum ph_once ph_sched_once(size_t queued, int all_settled, unsigned long round_work)
{
	if (queued || !all_settled)
		return PH_ONCE_WAIT;
	/* events emitted during this round may feed projections that
	 * already settled: go round again until a round finds nothing */
	return round_work ? PH_ONCE_AGAIN : PH_ONCE_EXIT;
}
