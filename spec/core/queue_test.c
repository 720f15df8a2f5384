/*
 * queue_test.c - checks of core/queue.c, run by spec/core/queue_spec.lua.
 * Prints "ok <name>" per check; exits non-zero at the first failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/frame.h"
#include "../../core/queue.h"
#include "check.h"

static int is(struct ph_qentry *e, const char *proj, const char *part)
{
	return e && strcmp(ph_queue_entry_proj(e), proj) == 0 && strcmp(ph_queue_entry_part(e), part) == 0;
}

static void merges_wakeups(void)
{
	struct ph_queue q;

	CHECK(ph_queue_init(&q) == 0);
	CHECK(ph_queue_wake(&q, "p", "a", 10, 0) == 0);
	CHECK(ph_queue_wake(&q, "p", "a", 5, 0) == 0);	/* merges, earlier wins */
	CHECK(ph_queue_wake(&q, "p", "a", 20, 0) == 0);
	CHECK(q.count == 1);
	CHECK(ph_queue_next_due(&q) == 5);
	CHECK(ph_queue_pop(&q, 4) == NULL);
	CHECK(is(ph_queue_pop(&q, 5), "p", "a"));
	CHECK(ph_queue_pop(&q, 100) == NULL);
	ph_queue_free(&q);
	puts("ok merges wake-ups into one entry");
}

static void fifo_and_delays(void)
{
	struct ph_queue q;
	struct ph_qentry *e;

	CHECK(ph_queue_init(&q) == 0);
	ph_queue_wake(&q, "p", "late", 50, 0);
	ph_queue_wake(&q, "p", "first", 0, 0);
	ph_queue_wake(&q, "p", "second", 0, 0);
	ph_queue_wake(&q, "q", "", 0, 0);
	CHECK(is(ph_queue_pop(&q, 0), "p", "first"));
	CHECK(is(ph_queue_pop(&q, 0), "p", "second"));
	CHECK(is(ph_queue_pop(&q, 0), "q", ""));
	CHECK(ph_queue_pop(&q, 49) == NULL);
	e = ph_queue_pop(&q, 50);
	CHECK(is(e, "p", "late"));
	ph_queue_free(&q);
	puts("ok serves due entries first-in first-out, delayed ones when due");
}

static void running_entries_get_dirty(void)
{
	struct ph_queue q;
	struct ph_qentry *e;

	CHECK(ph_queue_init(&q) == 0);
	ph_queue_wake(&q, "p", "", 0, 0);
	e = ph_queue_pop(&q, 0);
	CHECK(e != NULL && q.running == 1);
	/* woken while a worker has it: must run again, never lost */
	CHECK(ph_queue_wake(&q, "p", "", 0, 0) == 0);
	CHECK(q.count == 1 && ph_queue_pop(&q, 0) == NULL);
	ph_queue_done(&q, e, UINT64_MAX, 0);
	CHECK(q.count == 1 && q.running == 0);
	e = ph_queue_pop(&q, 0);
	CHECK(is(e, "p", ""));
	/* not woken: done frees it */
	ph_queue_done(&q, e, UINT64_MAX, 0);
	CHECK(q.count == 0);
	ph_queue_free(&q);
	puts("ok a wake-up for a running entry runs it again after it is done");
}

static void hard_delays_hold(void)
{
	struct ph_queue q;
	struct ph_qentry *e;

	CHECK(ph_queue_init(&q) == 0);
	ph_queue_wake(&q, "p", "", 0, 0);
	e = ph_queue_pop(&q, 0);
	ph_queue_done(&q, e, 1000, 1);	/* retry in 1 s */
	ph_queue_wake(&q, "p", "", 0, 0);	/* a new event must not cut the retry short */
	CHECK(ph_queue_pop(&q, 999) == NULL);
	CHECK(is(ph_queue_pop(&q, 1000), "p", ""));
	ph_queue_free(&q);
	puts("ok a retry delay is not shortened by wake-ups");
}

static void many_entries(void)
{
	struct ph_queue q;
	char part[32];
	unsigned long n = 0;
	struct ph_qentry *e;

	CHECK(ph_queue_init(&q) == 0);
	for (int i = 0; i < 200000; i++) {
		snprintf(part, sizeof(part), "s-%d", i);
		CHECK(ph_queue_wake(&q, "p", part, (uint64_t)(i % 7), 0) == 0);
	}
	for (int i = 0; i < 200000; i += 3) {
		snprintf(part, sizeof(part), "s-%d", i);
		CHECK(ph_queue_wake(&q, "p", part, 0, 0) == 0);
	}
	CHECK(q.count == 200000);
	while ((e = ph_queue_pop(&q, 10))) {
		ph_queue_done(&q, e, UINT64_MAX, 0);
		n++;
	}
	CHECK(n == 200000 && q.count == 0);
	ph_queue_free(&q);
	puts("ok 200,000 partitions: one entry each, all served");
}

static void frames(void)
{
	struct ph_framebuf fb = { 0 };
	char *a = ph_frame_encode("hello", 5), *b = ph_frame_encode("", 0), *out;
	size_t len;

	CHECK(ph_frame_push(&fb, a, 3) == 0);
	CHECK(ph_frame_next(&fb, &out, &len) == 0);	/* partial */
	CHECK(ph_frame_push(&fb, a + 3, 6) == 0);
	CHECK(ph_frame_push(&fb, b, 4) == 0);
	CHECK(ph_frame_next(&fb, &out, &len) == 1 && len == 5 && strcmp(out, "hello") == 0);
	free(out);
	CHECK(ph_frame_next(&fb, &out, &len) == 1 && len == 0);
	free(out);
	CHECK(ph_frame_next(&fb, &out, &len) == 0);
	CHECK(ph_frame_push(&fb, "\xff\xff\xff\xff", 4) == 0);	/* over PH_FRAME_MAX */
	CHECK(ph_frame_next(&fb, &out, &len) == -1);
	ph_frame_free(&fb);
	free(a);
	free(b);
	puts("ok frames: split reads, empty payloads, oversized lengths rejected");
}

/* Stream names have no length limit the queue would know of. */
static void long_keys(void)
{
	struct ph_queue q;
	size_t n = 200000;
	char *part = malloc(n + 1);
	struct ph_qentry *e;

	CHECK(part);
	memset(part, 'x', n);
	part[n] = '\0';
	CHECK(ph_queue_init(&q) == 0);
	CHECK(ph_queue_wake(&q, "p", part, 1, 0) == 0);
	CHECK(ph_queue_wake(&q, "p", part, 0, 0) == 0);	/* merges */
	CHECK(q.count == 1);
	part[n - 1] = 'y';
	CHECK(ph_queue_wake(&q, "p", part, 2, 0) == 0);	/* differs in its last byte only */
	CHECK(q.count == 2);
	part[n - 1] = 'x';
	e = ph_queue_pop(&q, 0);
	CHECK(is(e, "p", part));
	ph_queue_done(&q, e, UINT64_MAX, 0);
	CHECK(ph_queue_pop(&q, 1) == NULL);
	part[n - 1] = 'y';
	e = ph_queue_pop(&q, 2);
	CHECK(is(e, "p", part));
	ph_queue_done(&q, e, UINT64_MAX, 0);
	CHECK(q.count == 0);
	ph_queue_free(&q);
	free(part);
	puts("ok keys of any length");
}

int main(void)
{
	merges_wakeups();
	fifo_and_delays();
	running_entries_get_dirty();
	hard_delays_hold();
	many_entries();
	frames();
	long_keys();
	return 0;
}
