/*
 * registry.c - see registry.h.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fnv.h"
#include "log.h"
#include "proto.h"
#include "registry.h"

static int add(struct ph_registry *r, char **f, int n)
{
	struct ph_proj *np = realloc(r->projs, sizeof(*np) * (size_t)(r->n + 1));

	if (!np)
		return -1;
	r->projs = np;
	np = &r->projs[r->n];
	memset(np, 0, sizeof(*np));
	np->name = strdup(f[0]);
	np->value = strdup(f[2]);
	if (!np->name || !np->value) {
		free(np->name);
		free(np->value);
		return -1;
	}
	np->kind = f[1][0];
	np->partitioned = atoi(f[3]);
	np->budget = n >= 5 ? atof(f[4]) : 0;
	/* the watchdog converts it to ms: nothing past int64 */
	if (!(np->budget > 0) || !isfinite(np->budget))
		np->budget = 0;
	else if (np->budget > 1e9)
		np->budget = 1e9;
	snprintf(np->hash, sizeof(np->hash), "%s", n >= 6 ? f[5] : "");
	r->n++;
	return 0;
}

int ph_registry_read(char *msg, struct ph_registry *out, uint64_t *sig)
{
	char *f[8];
	int n, errors = 0;
	enum ph_verb v;

	*sig = 0;
	while ((v = ph_proto_next(&msg, f, 8, &n)) != PH_V_END) {
		if (v == PH_V_PROJ && n >= 4) {
			*sig ^= ph_fnv1a_str(ph_fnv1a_str(PH_FNV_OFFSET, f[0]), n >= 6 ? f[5] : "");
			if (out && add(out, f, n) != 0)
				ph_log(PH_ERROR, "host", "out of memory reading the projection list");
		} else if (v == PH_V_ERROR) {
			errors++;
			if (!out)
				continue;
			if (n >= 2 && *f[1])
				ph_log(PH_ERROR, "host", "%s; keeping the previous version of %s", f[0], f[1]);
			else
				ph_log(PH_ERROR, "host", "projection not loaded: %s", n >= 1 ? f[0] : "?");
		}
	}
	return errors;
}

struct ph_proj *ph_registry_find(const struct ph_registry *r, const char *name)
{
	for (int i = 0; i < r->n; i++)
		if (strcmp(r->projs[i].name, name) == 0)
			return &r->projs[i];
	return NULL;
}

void ph_registry_carry(struct ph_registry *now, const struct ph_registry *before, int quiet)
{
	for (int i = 0; i < now->n; i++) {
		struct ph_proj *p = &now->projs[i];
		const struct ph_proj *o = ph_registry_find(before, p->name);

		if (!o && !quiet)
			ph_log(PH_INFO, p->name, "loaded (hash %s)", p->hash);
		else if (o && strcmp(o->hash, p->hash) != 0 && !quiet)
			ph_log(PH_INFO, p->name, "reloaded (hash %s -> %s)", o->hash, p->hash);
		if (!o)
			continue;
		if (o->cursor)
			p->cursor = strdup(o->cursor);
		/* the same script reads the same streams: its next round can
		 * look at what changed; new code walks them all */
		if (o->since && strcmp(o->hash, p->hash) == 0)
			p->since = strdup(o->since);
		p->nparts = o->nparts;
	}
	for (int j = 0; !quiet && j < before->n; j++) {
		/* shadows ("name@version") come and go with their projection */
		if (!ph_registry_find(now, before->projs[j].name) && !strchr(before->projs[j].name, '@'))
			ph_log(PH_INFO, before->projs[j].name, "stopped: its file is gone (state and checkpoints kept)");
	}
}

void ph_registry_free(struct ph_registry *r)
{
	for (int i = 0; i < r->n; i++) {
		free(r->projs[i].name);
		free(r->projs[i].value);
		free(r->projs[i].cursor);
		free(r->projs[i].since);
	}
	free(r->projs);
	r->projs = NULL;
	r->n = 0;
}
