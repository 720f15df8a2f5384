/*
 * schedule.h - the master's scheduling rules, as pure functions of what they
 * decide on (an answer's status, counters, queue sizes, the time), so they
 * are checked without a loop, workers or PostgreSQL (spec/core/schedule_test.c).
 * The wake-up rules decide correctness: a rule that drops a wake-up loses
 * events until the fallback poll. master.c applies their results to the
 * queue (core/queue.h).
 */
#ifndef PH_SCHEDULE_H
#define PH_SCHEDULE_H

#include <stddef.h>
#include <stdint.h>

/* Partitions of one projection handed to a worker as one batch (one
 * transaction): catching up many small streams is not one BEGIN/COMMIT each
 * (1,000,000 streams: 128 a job left its fixed costs a tenth of the time);
 * the worker bounds the events a job reads (JOB_EVENTS in worker/parts.lua). */
#define PH_GROUP 1024
/* Queued partitions of one projection above which its discovery of more
 * waits: memory stays bounded when millions of partitions are behind (at
 * most this plus one page per projection), and a page is listed only when
 * the workers are about to need it. Counted per projection, never over the
 * whole queue: another projection's entries (its own discovery included)
 * must not hold this one back, or two partitioned projections in one host
 * wait for each other for ever. */
#define PH_FIND_AHEAD 4000
/* ...but a new round from the first stream waits at most this long for
 * them: a partition held back by a long retry delay must not stop the
 * discovery of others (it costs one page listed again per wait). */
#define PH_FIND_WAIT_MS 5000

/* When an entry runs again: at (UINT64_MAX: only when woken), hard (a
 * retry delay wake-ups must not shorten), settled (an unpartitioned
 * projection that need not run again: --once may end). */
struct ph_next {
	uint64_t at;
	int hard;
	int settled;
};

/**
 * ph_sched_done() - when a batch that answered @status runs again.
 * @status: "more", "idle", "held", "locked", "retry", "dberror", or an
 *          operator's state ("failed", "stopped", "paused")
 * @delay: seconds the worker asked for (retry, dberror)
 * @attempts: the entry's failed attempts, counted here
 * @holds: the entry's consecutive "held" answers, counted here
 * @now: ms
 */
struct ph_next ph_sched_done(const char *status, double delay, unsigned *attempts, unsigned *holds, uint64_t now);

/**
 * ph_sched_reads() - whether a projection whose source is @kind ('a' all,
 * 'c' category, 's' stream) with @value reads @stream: the category of a
 * stream is what precedes its first '-'.
 */
int ph_sched_reads(char kind, const char *value, const char *stream);

/**
 * ph_sched_find_waits() - whether a discovery may not list now (then it is
 * tried again in 50 ms, a hard delay).
 * @nparts: the projection's queued partitions
 * @new_walk: the round starts a walk from the first stream (not a window,
 *            not the middle of a round)
 * @round_wait: since when such a round waits (0: not); kept here
 * @now: ms
 */
int ph_sched_find_waits(size_t nparts, int new_walk, uint64_t *round_wait, uint64_t now);

/**
 * ph_sched_after_find() - when a discovery that answered runs again.
 * @status: "more" (the round goes on) or how it ended ("idle", ...)
 * @nfound: partitions it listed behind
 * @nparts: the projection's queued partitions now
 * @window_next: its next round is a window (cheap: may start when woken)
 * @now: ms
 * @plain: set when the answer is to be treated like a batch's @status
 *         (ph_sched_done()) instead of the returned time
 */
struct ph_next ph_sched_after_find(const char *status, unsigned long nfound, size_t nparts,
				   int window_next, uint64_t now, int *plain);

/* --once: what to do when the queue may have drained */
enum ph_once { PH_ONCE_WAIT, PH_ONCE_AGAIN, PH_ONCE_EXIT };

/**
 * ph_sched_once() - the --once settle rule.
 * @queued: entries in the queue
 * @all_settled: every projection's last answer settled it
 * @round_work: events applied since the last full round (emitted events
 *              may feed projections that settled before them)
 *
 * Return: wait, go round again (wake all), or exit.
 */
enum ph_once ph_sched_once(size_t queued, int all_settled, unsigned long round_work);

#endif
