/*
 * beat.h - a worker's heartbeat, in a page shared with the master.
 *
 * The worker stamps the start time, position and kind of each call into
 * projection code; the master's watchdog reads it and SIGKILLs a worker
 * whose code overran its budget, and when a worker dies in the middle of
 * such a call (killed, exit(), a signal) the master charges the event with
 * it. A store per event, no message: the pipe stays quiet while a batch of
 * thousands of events runs.
 */
#ifndef PH_BEAT_H
#define PH_BEAT_H

#include <stdint.h>

/* What the worker is running; names as in ph_beat_kind_name(). */
enum ph_beat_kind {
	PH_BEAT_NONE = 0,
	PH_BEAT_HANDLER,	/* "handler": a when[type] handler */
	PH_BEAT_ON_ERROR,	/* "on_error" */
	PH_BEAT_CAUGHT_UP,	/* "caught_up" */
	PH_BEAT_INIT,		/* "init": the projection's init() */
	PH_BEAT_SQL,		/* "sql": waiting for a handler's pipelined statements */
	PH_BEAT_LOAD,		/* "load": loading a projection file */
	PH_BEAT_NKINDS
};

struct ph_beat {
	int64_t started_ms;	/* CLOCK_MONOTONIC ms when the call began, 0 when idle */
	int64_t position;	/* global position of the event being handled */
	int32_t kind;		/* enum ph_beat_kind */
	int32_t backend_pid;	/* the worker's PostgreSQL backend, 0 when unknown */
};

/**
 * ph_beat_set_backend() - the PostgreSQL backend the worker talks to (worker
 * side): a statement it left running when it died may still hold its
 * batch's locks, and the next worker ends it (see proto.h, overrun).
 */
void ph_beat_set_backend(struct ph_beat *b, int32_t pid);

/** ph_beat_backend() - the pid set by ph_beat_set_backend(), or 0. */
int32_t ph_beat_backend(const struct ph_beat *b);

/** ph_beat_kind_name() - "handler", "on_error", ...; "code" for an unknown kind. */
const char *ph_beat_kind_name(int kind);

/** ph_beat_kind_of() - the kind named @name, or -1. */
int ph_beat_kind_of(const char *name);

/**
 * ph_beat_create() - a new shared page (master side).
 * @fd: receives a descriptor to hand to the worker (close it after spawning)
 *
 * Return: the mapping, or NULL with errno set.
 */
struct ph_beat *ph_beat_create(int *fd);

/** ph_beat_attach() - map the page behind @fd (worker side), or NULL. */
struct ph_beat *ph_beat_attach(int fd);

/** ph_beat_release() - unmap. */
void ph_beat_release(struct ph_beat *b);

/** ph_beat_now_ms() - CLOCK_MONOTONIC in ms: one clock for both processes. */
int64_t ph_beat_now_ms(void);

/** ph_beat_set() - @kind code starts on @position (worker side). */
void ph_beat_set(struct ph_beat *b, int64_t position, int kind);

/** ph_beat_clear() - the code returned. */
void ph_beat_clear(struct ph_beat *b);

/**
 * ph_beat_read() - how long the current call has run (master side).
 * @position: receives its event's position
 * @kind: receives what runs (enum ph_beat_kind)
 *
 * Return: elapsed ms, or -1 when nothing is running.
 */
int64_t ph_beat_read(const struct ph_beat *b, int64_t *position, int *kind);

#endif
