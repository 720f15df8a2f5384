/*
 * schedule_test.c - checks of core/schedule.c (the master's wake-up and
 * requeue rules), run by spec/core/schedule_spec.lua. Prints "ok <name>"
 * per check; exits non-zero at the first failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/schedule.h"
#include "check.h"

static void batch_answers(void)
{
	unsigned attempts = 3, holds = 4;
	struct ph_next n;

	n = ph_sched_done("more", 0, &attempts, &holds, 1000);
	CHECK(n.at == 1000 && !n.hard && !n.settled && attempts == 0 && holds == 0);
	attempts = 2, holds = 2;
	n = ph_sched_done("idle", 0, &attempts, &holds, 1000);
	CHECK(n.at == UINT64_MAX && n.settled && attempts == 0 && holds == 0);
	/* held: soon, backing off 2, 4, 8 ... ms up to 1,024, soft (a wake-up may come sooner) */
	holds = 0;
	n = ph_sched_done("held", 0, &attempts, &holds, 1000);
	CHECK(n.at == 1002 && !n.hard && !n.settled && holds == 1);
	n = ph_sched_done("held", 0, &attempts, &holds, 1000);
	CHECK(n.at == 1004 && holds == 2);
	for (int i = 0; i < 20; i++)
		n = ph_sched_done("held", 0, &attempts, &holds, 1000);
	CHECK(n.at == 1000 + 1024 && holds == 22);
	/* locked: looked at again after the holder commits; never dropped */
	n = ph_sched_done("locked", 0, &attempts, &holds, 1000);
	CHECK(n.at == 1500 && n.hard && !n.settled);
	/* retry, dberror: the worker's delay, counted, hard */
	attempts = 0;
	n = ph_sched_done("retry", 2.5, &attempts, &holds, 1000);
	CHECK(n.at == 3500 && n.hard && attempts == 1);
	n = ph_sched_done("dberror", 0.25, &attempts, &holds, 1000);
	CHECK(n.at == 1250 && n.hard && attempts == 2);
	n = ph_sched_done("retry", -5, &attempts, &holds, 1000);
	CHECK(n.at == 1000);
	/* operator states wait for an operator's wake-up */
	n = ph_sched_done("failed", 0, &attempts, &holds, 1000);
	CHECK(n.at == UINT64_MAX && n.settled);
	n = ph_sched_done("paused", 0, &attempts, &holds, 1000);
	CHECK(n.at == UINT64_MAX && n.settled);
	/* a finished partition, and one held behind a dead letter, too:
	 * never polled (a held partition is "holding", not "held") */
	n = ph_sched_done("done", 0, &attempts, &holds, 1000);
	CHECK(n.at == UINT64_MAX && n.settled && !n.hard);
	n = ph_sched_done("holding", 0, &attempts, &holds, 1000);
	CHECK(n.at == UINT64_MAX && n.settled && !n.hard);
	puts("ok a batch's answer says when it runs again");
}

static void which_streams(void)
{
	CHECK(ph_sched_reads('a', "", "anything-1"));
	CHECK(ph_sched_reads('c', "account", "account-1"));
	CHECK(ph_sched_reads('c', "account", "account"));
	CHECK(ph_sched_reads('c', "account", "account-1-2"));
	CHECK(!ph_sched_reads('c', "account", "accounts-1"));
	CHECK(!ph_sched_reads('c', "account", "acc-1"));
	CHECK(!ph_sched_reads('c', "account", "*"));
	CHECK(ph_sched_reads('s', "account-1", "account-1"));
	CHECK(!ph_sched_reads('s', "account-1", "account-10"));
	CHECK(!ph_sched_reads('x', "account-1", "account-1"));
	puts("ok a projection is woken by the streams it reads");
}

static void discovery_back_pressure(void)
{
	uint64_t wait = 0;

	/* enough partitions queued: workers process them first */
	CHECK(ph_sched_find_waits(PH_FIND_AHEAD + 1, 0, &wait, 100));
	CHECK(!ph_sched_find_waits(PH_FIND_AHEAD, 0, &wait, 100));
	/* a window or the middle of a round never waits for queued partitions */
	CHECK(!ph_sched_find_waits(10, 0, &wait, 100) && wait == 0);
	/* a new walk waits for them, at most PH_FIND_WAIT_MS */
	CHECK(ph_sched_find_waits(10, 1, &wait, 100) && wait == 100);
	CHECK(ph_sched_find_waits(10, 1, &wait, 100 + PH_FIND_WAIT_MS - 1));
	CHECK(!ph_sched_find_waits(10, 1, &wait, 100 + PH_FIND_WAIT_MS) && wait == 0);
	CHECK(!ph_sched_find_waits(0, 1, &wait, 200));
	/* time 0 still counts as waiting */
	wait = 0;
	CHECK(ph_sched_find_waits(1, 1, &wait, 0) && wait == 1);
	puts("ok discovery waits while its partitions are queued, but not for ever");
}

static void after_discovery(void)
{
	int plain;
	struct ph_next n;

	n = ph_sched_after_find("more", 5, PH_FIND_AHEAD + 1, 0, 1000, &plain);
	CHECK(!plain && n.at == 1050 && n.hard);
	ph_sched_after_find("more", 5, 10, 0, 1000, &plain);
	CHECK(plain);
	/* found some: look again in 500 ms, sooner if woken only for a window */
	n = ph_sched_after_find("idle", 5, 10, 0, 1000, &plain);
	CHECK(!plain && n.at == 1500 && n.hard);
	n = ph_sched_after_find("idle", 5, 10, 1, 1000, &plain);
	CHECK(!plain && n.at == 1500 && !n.hard);
	/* found none: the round's status decides (idle settles it) */
	ph_sched_after_find("idle", 0, 0, 1, 1000, &plain);
	CHECK(plain);
	puts("ok a discovery's answer says when it looks again");
}

static void once_rule(void)
{
	CHECK(ph_sched_once(1, 1, 0) == PH_ONCE_WAIT);
	CHECK(ph_sched_once(0, 0, 0) == PH_ONCE_WAIT);
	CHECK(ph_sched_once(0, 1, 7) == PH_ONCE_AGAIN);
	CHECK(ph_sched_once(0, 1, 0) == PH_ONCE_EXIT);
	puts("ok --once exits after a full round that applied nothing");
}

int main(void)
{
	batch_answers();
	which_streams();
	discovery_back_pressure();
	after_discovery();
	once_rule();
	return 0;
}
