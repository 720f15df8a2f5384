/*
 * beat.h - a worker's heartbeat, in a page shared with the master.
 *
 * The worker stamps the start time and position of each handler call; the
 * master's watchdog reads it and SIGKILLs a worker whose handler overran its
 * budget. A store per event, no message: the pipe stays quiet while a
 * batch of thousands of events runs.
 */
#ifndef PH_BEAT_H
#define PH_BEAT_H

#include <stdint.h>

struct ph_beat {
	int64_t started_ms;	/* CLOCK_MONOTONIC ms when the handler began, 0 when idle */
	int64_t position;	/* global position of the event being handled */
};

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

/** ph_beat_set() - a handler starts on @position (worker side). */
void ph_beat_set(struct ph_beat *b, int64_t position);

/** ph_beat_clear() - the handler returned. */
void ph_beat_clear(struct ph_beat *b);

/**
 * ph_beat_read() - how long the current handler has run (master side).
 * @position: receives its event's position
 *
 * Return: elapsed ms, or -1 when no handler is running.
 */
int64_t ph_beat_read(const struct ph_beat *b, int64_t *position);

#endif
