/*
 * registry.h - the projections the master serves: what a worker's answer
 * to "init"/"reload" says (name, source, partitioned, budget, script hash),
 * the master's own per-projection scheduling state, and what changed
 * between two answers (the "loaded", "reloaded" and "stopped" lines). A
 * signature of the (name, hash) set tells whether two workers read the
 * same versions of the files.
 */
#ifndef PH_REGISTRY_H
#define PH_REGISTRY_H

#include <stdint.h>

struct ph_proj {
	char *name;
	char kind;		/* 'a'll, 's'tream, 'c'ategory */
	char *value;
	int partitioned;
	int settled;		/* last batch found nothing more to do (for --once) */
	char *cursor;		/* partition discovery: the round goes on from this token */
	char *since;		/* ...and the next round starts from this one (the
				 * worker's token, see find_partitions in worker/discovery.lua;
				 * NULL: walk every stream) */
	long nparts;		/* its partition entries in the queue (waiting or running) */
	uint64_t round_wait;	/* since when a new discovery round waits for them (0: not) */
	double budget;		/* seconds a handler may run before its worker is killed */
	char hash[24];		/* of the script, for "reloaded NAME (hash a->b)" */
};

struct ph_registry {
	struct ph_proj *projs;
	int n;
};

/**
 * ph_registry_read() - read a worker's answer (its "proj" and "error"
 * lines, see proto.h).
 * @msg: the answer after its first line; consumed
 * @out: receives the projections when non-NULL (else only @sig is made)
 * @sig: receives the signature of the (name, hash) set
 *
 * Load errors are logged when @out is given.
 * Return: the number of files that failed to load.
 */
int ph_registry_read(char *msg, struct ph_registry *out, uint64_t *sig);

/**
 * ph_registry_carry() - @now replaces @before: log what was loaded,
 * reloaded and stopped (unless @quiet), and carry each projection's
 * discovery cursor, queued partition count and - when its script is the
 * same, so it reads the same streams - where its next round starts.
 */
void ph_registry_carry(struct ph_registry *now, const struct ph_registry *before, int quiet);

/** ph_registry_find() - the projection named @name, or NULL. */
struct ph_proj *ph_registry_find(const struct ph_registry *r, const char *name);

/** ph_registry_free() - free @r's projections; @r is empty afterwards. */
void ph_registry_free(struct ph_registry *r);

#endif
