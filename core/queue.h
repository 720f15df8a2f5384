/*
 * queue.h - the master's work queue.
 *
 * One entry per (projection, partition). A wake-up for an entry that is
 * already queued merges into it; one for an entry being processed marks it
 * dirty so it runs again when the worker reports back (a wake-up is never
 * lost). Entries may carry valid_after (retry delays, horizon re-polls),
 * kept in a min-heap so the loop sleeps until the earliest one is due.
 */
#ifndef PH_QUEUE_H
#define PH_QUEUE_H

#include <stddef.h>
#include <stdint.h>

enum ph_qstate {
	PH_Q_WAITING,	/* in the heap (due or not) */
	PH_Q_RUNNING,	/* handed to a worker */
};

struct ph_qentry {
	char *key;		/* "projection\0partition" */
	size_t keylen;
	uint64_t valid_after;	/* ms, monotonic */
	uint64_t seq;		/* FIFO among equally due entries */
	enum ph_qstate state;
	int hard;		/* valid_after is a retry delay: wake-ups don't shorten it */
	int dirty;		/* woken while running */
	size_t heap_idx;
	unsigned attempts;	/* consecutive failures, for backoff */
	unsigned holds;		/* consecutive horizon hold-backs */
	/* A worker died while running projection code on an event of this
	 * entry (see beat.h); the next job charges that event with it. */
	int overrun_kind;	/* enum ph_beat_kind; 0: nothing to charge */
	int64_t overrun_pos;	/* the event's global position */
	double overrun_budget;	/* > 0: the watchdog killed it past this budget (s) */
	int overrun_exit;	/* else its exit status, */
	int overrun_signal;	/* or the signal that ended it */
	int32_t overrun_backend;	/* its PostgreSQL backend (0: unknown) */
	struct ph_qentry *next;	/* hash chain */
};

struct ph_queue {
	struct ph_qentry **buckets;
	size_t nbuckets, count;
	struct ph_qentry **heap;	/* waiting entries ordered by (valid_after, seq) */
	size_t heap_len, heap_cap;
	uint64_t seq;
	size_t running;
};

/** ph_queue_init() - empty queue. Return: 0 or -1 (ENOMEM). */
int ph_queue_init(struct ph_queue *q);

/** ph_queue_free() - release every entry. */
void ph_queue_free(struct ph_queue *q);

/**
 * ph_queue_wake() - ask for (projection, partition) to be processed at or
 * after @valid_after.
 * @hard: the delay is a retry backoff that later wake-ups must not shorten
 *
 * Return: 0, or -1 when out of memory.
 */
int ph_queue_wake(struct ph_queue *q, const char *proj, const char *part,
		  uint64_t valid_after, int hard);

/**
 * ph_queue_pop() - take the first due entry and mark it running.
 * @now: current time in ms
 *
 * Return: the entry (owned by the queue until ph_queue_done()), or NULL.
 */
struct ph_qentry *ph_queue_pop(struct ph_queue *q, uint64_t now);

/**
 * ph_queue_peek() - the first due entry without taking it, or NULL.
 */
struct ph_qentry *ph_queue_peek(struct ph_queue *q, uint64_t now);

/**
 * ph_queue_done() - the worker finished @e.
 * @requeue_at: when to run it again, or UINT64_MAX for "only if woken"
 * @hard: as for ph_queue_wake()
 *
 * A dirty entry is requeued at once (unless a hard delay asks for later).
 * An entry that need not run again is freed.
 */
void ph_queue_done(struct ph_queue *q, struct ph_qentry *e, uint64_t requeue_at, int hard);

/**
 * ph_queue_next_due() - valid_after of the earliest waiting entry.
 * Return: ms, or UINT64_MAX when nothing waits.
 */
uint64_t ph_queue_next_due(const struct ph_queue *q);

/** ph_queue_entry_proj() / _part() - the two halves of an entry's key. */
static inline const char *ph_queue_entry_proj(const struct ph_qentry *e) { return e->key; }
static inline const char *ph_queue_entry_part(const struct ph_qentry *e)
{
	return e->key + __builtin_strlen(e->key) + 1;
}

#endif
