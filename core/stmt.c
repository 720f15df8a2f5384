/*
 * stmt.c - the prepared statement cache (see stmt.h).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fnv.h"
#include "stmt.h"

/* texts remembered at most; beyond this new texts are sent unnamed */
#define PH_STMTS_TEXTS 1024
#define PH_STMTS_SLOTS (PH_STMTS_TEXTS * 2)	/* open addressing, load <= 1/2 */

struct ph_stmt {
	char *sql;		/* NULL: free slot */
	uint64_t hash;
	unsigned id;		/* 0: not prepared; else the name is "ph_<id>" */
	char name[16];
};

struct ph_stmts {
	struct ph_stmt slot[PH_STMTS_SLOTS];
	unsigned texts, prepared, max_prepared, next_id;
};

ph_stmts *ph_stmts_new(unsigned max_prepared)
{
	ph_stmts *s = calloc(1, sizeof(*s));

	if (s)
		s->max_prepared = max_prepared;
	return s;
}

void ph_stmts_free(ph_stmts *s)
{
	if (!s)
		return;
	for (size_t i = 0; i < PH_STMTS_SLOTS; i++)
		free(s->slot[i].sql);
	free(s);
}

const char *ph_stmts_use(ph_stmts *s, const char *sql, int *parse)
{
	uint64_t h = ph_fnv1a_str(PH_FNV_OFFSET, sql);
	size_t i = (size_t)(h % PH_STMTS_SLOTS);
	struct ph_stmt *e;

	*parse = 0;
	for (;; i = (i + 1) % PH_STMTS_SLOTS) {
		e = &s->slot[i];
		if (!e->sql)
			break;
		if (e->hash == h && strcmp(e->sql, sql) == 0)
			goto found;
	}
	/* a new text: remember it (sent unnamed this first time) */
	if (s->texts >= PH_STMTS_TEXTS || !(e->sql = strdup(sql)))
		return NULL;
	e->hash = h;
	e->id = 0;
	s->texts++;
	return NULL;
found:
	if (e->id)
		return e->name;
	if (s->prepared >= s->max_prepared)
		return NULL;
	e->id = ++s->next_id;
	snprintf(e->name, sizeof(e->name), "ph_%u", e->id);
	s->prepared++;
	*parse = 1;
	return e->name;
}

void ph_stmts_forget(ph_stmts *s, const char *name)
{
	for (size_t i = 0; i < PH_STMTS_SLOTS; i++) {
		struct ph_stmt *e = &s->slot[i];

		if (e->sql && e->id && strcmp(e->name, name) == 0) {
			e->id = 0;
			e->name[0] = '\0';
			s->prepared--;
			return;
		}
	}
}
