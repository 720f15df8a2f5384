/*
 * registry_test.c - checks of core/registry.c (the projections a worker's
 * answer lists, and what changed between two answers), run by
 * spec/core/schedule_spec.lua. Prints "ok <name>" per check; exits
 * non-zero at the first failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/proto.h"
#include "../../core/registry.h"
#include "check.h"

static void proj_line(struct ph_msg *mb, const char *name, const char *kind, const char *value,
		      const char *parts, const char *budget, const char *hash)
{
	ph_msg_line(mb, PH_V_PROJ);
	ph_msg_str(mb, name);
	ph_msg_str(mb, kind);
	ph_msg_str(mb, value);
	ph_msg_str(mb, parts);
	ph_msg_str(mb, budget);
	ph_msg_str(mb, hash);
}

/* a NUL-terminated copy: ph_registry_read parses in place */
static char *text(struct ph_msg *mb)
{
	char *s = malloc(mb->len + 1);

	CHECK(s && !mb->failed);
	memcpy(s, mb->buf, mb->len);
	s[mb->len] = '\0';
	return s;
}

static void reads_answers(void)
{
	struct ph_msg mb = { 0 };
	struct ph_registry r = { 0 };
	uint64_t sig, sig2;
	char *s;

	proj_line(&mb, "balances", "c", "account", "1", "30", "aaaa");
	proj_line(&mb, "odd\tname", "s", "a b\nc", "0", "1e300", "bbbb");
	proj_line(&mb, "nanny", "a", "", "0", "nan", "cccc");
	ph_msg_line(&mb, PH_V_ERROR);
	ph_msg_str(&mb, "broken.lua:3: syntax");
	s = text(&mb);
	CHECK(ph_registry_read(s, &r, &sig) == 1);
	CHECK(r.n == 3);
	CHECK(strcmp(r.projs[0].name, "balances") == 0 && r.projs[0].kind == 'c' && r.projs[0].partitioned == 1);
	CHECK(r.projs[0].budget == 30 && strcmp(r.projs[0].hash, "aaaa") == 0);
	/* any byte survives the wire */
	CHECK(strcmp(r.projs[1].name, "odd\tname") == 0 && strcmp(r.projs[1].value, "a b\nc") == 0);
	/* budgets the watchdog cannot hold: capped, or none */
	CHECK(r.projs[1].budget == 1e9 && r.projs[2].budget == 0);
	CHECK(ph_registry_find(&r, "nanny") == &r.projs[2] && ph_registry_find(&r, "nope") == NULL);
	free(s);
	/* the signature is of the (name, hash) set, in any order */
	ph_msg_free(&mb);
	memset(&mb, 0, sizeof(mb));
	proj_line(&mb, "nanny", "a", "", "0", "0", "cccc");
	proj_line(&mb, "odd\tname", "s", "x", "0", "0", "bbbb");
	proj_line(&mb, "balances", "c", "other", "0", "0", "aaaa");
	s = text(&mb);
	CHECK(ph_registry_read(s, NULL, &sig2) == 0);
	CHECK(sig == sig2);
	free(s);
	ph_msg_free(&mb);
	memset(&mb, 0, sizeof(mb));
	proj_line(&mb, "nanny", "a", "", "0", "0", "cccd");
	s = text(&mb);
	ph_registry_read(s, NULL, &sig2);
	CHECK(sig != sig2);
	free(s);
	ph_msg_free(&mb);
	ph_registry_free(&r);
	CHECK(r.n == 0 && r.projs == NULL);
	puts("ok reads a worker's answer, any byte in any field");
}

static void carries_state(void)
{
	struct ph_msg mb = { 0 };
	struct ph_registry before = { 0 }, now = { 0 };
	uint64_t sig;
	char *s;

	proj_line(&mb, "same", "c", "a", "1", "0", "h1");
	proj_line(&mb, "changed", "c", "b", "1", "0", "h2");
	proj_line(&mb, "gone", "a", "", "0", "0", "h3");
	s = text(&mb);
	ph_registry_read(s, &before, &sig);
	free(s);
	ph_msg_free(&mb);
	before.projs[0].cursor = strdup("w 1 0 0 x");
	before.projs[0].since = strdup("i 5 6 7");
	before.projs[0].nparts = 42;
	before.projs[1].since = strdup("i 1 2 3");
	before.projs[1].nparts = 7;

	memset(&mb, 0, sizeof(mb));
	proj_line(&mb, "same", "c", "a", "1", "0", "h1");
	proj_line(&mb, "changed", "c", "b", "1", "0", "h2b");
	proj_line(&mb, "new", "a", "", "0", "0", "h4");
	s = text(&mb);
	ph_registry_read(s, &now, &sig);
	free(s);
	ph_msg_free(&mb);
	ph_registry_carry(&now, &before, 0);
	/* the same script goes on where it was */
	CHECK(strcmp(now.projs[0].cursor, "w 1 0 0 x") == 0 && strcmp(now.projs[0].since, "i 5 6 7") == 0);
	CHECK(now.projs[0].nparts == 42);
	/* new code walks its streams again; its queued partitions still count */
	CHECK(now.projs[1].since == NULL && now.projs[1].nparts == 7);
	CHECK(now.projs[2].since == NULL && now.projs[2].nparts == 0);
	ph_registry_free(&before);
	ph_registry_free(&now);
	puts("ok carries a projection's discovery state across a reload of the same script only");
}

int main(void)
{
	reads_answers();
	carries_state();
	return 0;
}
