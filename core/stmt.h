/*
 * stmt.h - which SQL texts a connection runs as named prepared statements.
 *
 * A worker sends the same few statements thousands of times (its read, the
 * checkpoint lock and update, a projection's ctx:exec upserts). Parsing and
 * planning each one again costs the server as much as running it, so a
 * text seen for the second time is prepared once (Parse) and executed by
 * name from then on (psycopg 3 does the same with prepare_threshold).
 * One-off texts (dynamic SQL) stay unnamed and never fill the server's memory:
 * the cache holds a bounded number of texts and of prepared statements.
 *
 * Nothing here talks to the server: the caller sends the Parse and reports
 * back when one failed (ph_stmts_forget), so the next use tries again.
 */
#ifndef PH_STMT_H
#define PH_STMT_H

typedef struct ph_stmts ph_stmts;

/**
 * ph_stmts_new() - an empty cache.
 * @max_prepared: at most this many statements are ever prepared (per connection)
 *
 * Return: the cache, or NULL when out of memory.
 */
ph_stmts *ph_stmts_new(unsigned max_prepared);

/** ph_stmts_free() - free @s (NULL is fine); the server's statements die with the session. */
void ph_stmts_free(ph_stmts *s);

/**
 * ph_stmts_use() - count a use of @sql and say how to send it.
 * @s: the cache
 * @sql: the statement text
 * @parse: set to 1 when the caller must prepare the returned name first
 *         (it is new), 0 when it is already prepared or when NULL is returned
 *
 * Return: the statement's name ("ph_<n>"), or NULL: send it unnamed.
 */
const char *ph_stmts_use(ph_stmts *s, const char *sql, int *parse);

/**
 * ph_stmts_forget() - the server does not have @name after all (its Parse
 * failed or was skipped, or its plan went stale): prepare it again, under a
 * new name, at its next use.
 */
void ph_stmts_forget(ph_stmts *s, const char *name);

#endif
