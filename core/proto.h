/*
 * proto.h - the messages between the master and its workers (one home:
 * the master's side is here, the worker's side is lua/projhost/wire.lua).
 *
 * A message is one frame (see frame.h) of lines separated by "\n"; a line
 * is a verb and its fields separated by "\t". Every field is escaped
 * ("\\" -> "\\\\", tab -> "\\t", newline -> "\\n"), so a field may hold any
 * byte but NUL (stream names, error messages, paths, a dsn).
 *
 *   master -> worker
 *     init   <dsn> <path>...            load projections, connect
 *     job    <projection> <partition>...  one batch; an unpartitioned
 *                                      projection has partition ""
 *       overrun <position> <kind> <reason> <backend>  (lines after job or
 *                                      find) a worker died while running
 *                                      <kind> code (see beat.h) on that
 *                                      event: count it as a failure instead
 *                                      of running it again (for this job
 *                                      only); <backend> is its PostgreSQL
 *                                      backend's pid (0: unknown), which
 *                                      may still run a statement of the
 *                                      batch and hold its locks
 *     find   <projection> <token>      list partitions that are behind
 *     reload                           load the files again (between jobs)
 *     quit                             exit after this
 *   worker -> master
 *     proj   <name> <kind> <value> <partitioned> <budget> <hash>
 *     error  <message> <kept projection>   then
 *     ready                            the answer to init and reload
 *     done   <projection> <count>      the answer to job, then a line
 *       part <partition> <status> <delay>  per partition of the job
 *     found  <projection> <more|idle> <token>  the answer to find, then
 *       part <partition>               per partition that is behind
 *     relist                           (in any answer) a shadow rebuild
 *                                      switched over: reload every worker
 *     fails  <projection> <action> <n>  (in any answer) <n> failed events
 *                                      of <projection> got the error
 *                                      <action> (retry, skip, park, hold, fail,
 *                                      stop) since the last answer; for
 *                                      projhost_handler_errors_total
 *     due    <projection> <seconds>    (in a done or found answer) the
 *                                      projection's next timer is due in
 *                                      <seconds> (ctx:schedule, every; see
 *                                      worker/timers.lua): the master wakes
 *                                      its entry "" then - the batch of an
 *                                      unpartitioned projection, the
 *                                      discovery of a partitioned one, which
 *                                      lists the partitions with due timers
 *     fired  <projection> <n>          (in a done answer) the batch fired <n>
 *                                      timers; for projhost_timers_fired_total
 *
 * The master times each job from sending it to its "done" answer (the
 * batch duration it exports); "done"'s <count> is the events applied, and
 * a "done" answer re-checks the HTTP /wait requests of that projection.
 *
 * Statuses: more (batch was full), idle (caught up), held (events waiting
 * behind the xmin horizon), locked (another worker or instance has it),
 * retry (handler asked for a delay), dberror, failed, stopped, paused,
 * done (a handler finished the partition: ctx:done), holding (the
 * partition waits behind a held dead letter: on_error "hold"). A status the
 * master does not know is settled like failed (ph_sched_done).
 *
 * Discovery tokens are the worker's (find_partitions in worker/discovery.lua
 * says what they hold): the master sends a round's pages the token of the page
 * before ("more"), and starts the next round from the token the last one
 * ended with ("idle"); "" walks every stream.
 *
 * Sizes: user data (stream names, error text) must never push a message
 * past PH_FRAME_MAX, so a job holds partitions only up to PH_PROTO_BUDGET
 * bytes, a find answer stops adding partitions past that budget (its
 * token goes on after the last one included), and an error line is cut at
 * PH_PROTO_ERROR_MAX bytes.
 */
#ifndef PH_PROTO_H
#define PH_PROTO_H

#include <stddef.h>
#include <stdint.h>

/* A worker's descriptors: the master's messages come and go on
 * PH_WORKER_PIPE_FD, the heartbeat page (beat.h) is PH_WORKER_BEAT_FD
 * (projhost.core exports both as core.WORKER_PIPE_FD, core.WORKER_BEAT_FD). */
#define PH_WORKER_PIPE_FD 3
#define PH_WORKER_BEAT_FD 4

/* Bytes of partitions in one job or find answer (escaped). */
#define PH_PROTO_BUDGET (1u << 20)
/* Bytes of one error message from the loader. */
#define PH_PROTO_ERROR_MAX 4096

enum ph_verb {
	PH_V_END = 0,	/* no more lines */
	PH_V_UNKNOWN,
	PH_V_INIT,
	PH_V_JOB,
	PH_V_OVERRUN,
	PH_V_FIND,
	PH_V_RELOAD,
	PH_V_QUIT,
	PH_V_PROJ,
	PH_V_ERROR,
	PH_V_READY,
	PH_V_DONE,
	PH_V_PART,
	PH_V_FOUND,
	PH_V_RELIST,
	PH_V_FAILS,
	PH_V_DUE,
	PH_V_FIRED,
};

/** ph_proto_verb_name() - the verb as written in a message ("" for END). */
const char *ph_proto_verb_name(enum ph_verb v);

/** ph_proto_escaped_len() - bytes of @s[0..@n) once escaped. */
size_t ph_proto_escaped_len(const char *s, size_t n);

/**
 * ph_proto_escape() - write @s[0..@n) escaped to @dst, which has room for
 * ph_proto_escaped_len() bytes. Return: the end of what was written.
 */
char *ph_proto_escape(char *dst, const char *s, size_t n);

/**
 * ph_proto_unescape() - undo ph_proto_escape() in place on the
 * NUL-terminated @s (a backslash before any other byte stays as it is).
 * Return: the new length.
 */
size_t ph_proto_unescape(char *s);

/** struct ph_msg - a message under construction. */
struct ph_msg {
	char *buf;
	size_t len, cap;
	int failed;	/* out of memory: drop the message */
};

/** ph_msg_line() - start a line with @v (the first line needs no "\n"). */
void ph_msg_line(struct ph_msg *mb, enum ph_verb v);

/** ph_msg_field() - add a field to the current line, escaped. */
void ph_msg_field(struct ph_msg *mb, const char *s, size_t n);

/** ph_msg_str() - ph_msg_field() of a NUL-terminated string. */
void ph_msg_str(struct ph_msg *mb, const char *s);

/** ph_msg_int() - a decimal integer field. */
void ph_msg_int(struct ph_msg *mb, int64_t v);

/** ph_msg_free() - release the buffer. */
void ph_msg_free(struct ph_msg *mb);

/**
 * ph_proto_next() - the next line of a received message, parsed in place.
 * @cursor: in: where to start (the message, NUL-terminated); out: past the
 *          line. The message is modified.
 * @f: receives the fields after the verb, unescaped
 * @max: room in @f; fields past it are dropped
 * @n: receives the number of fields
 *
 * Return: the line's verb, PH_V_UNKNOWN (f[0] is then the verb text and
 * the rest are not parsed), or PH_V_END after the last line.
 */
enum ph_verb ph_proto_next(char **cursor, char **f, int max, int *n);

/** ph_proto_first() - the verb of the first line of @msg, not modifying it. */
enum ph_verb ph_proto_first(const char *msg);

/* Messages the master sends. Each starts a new message in @mb. */

/** ph_proto_init() - "init" with the dsn and the paths to serve. */
void ph_proto_init(struct ph_msg *mb, const char *dsn, const char *const *paths, int npaths);

/** ph_proto_find() - "find" for @proj from after @cursor ("" = the start). */
void ph_proto_find(struct ph_msg *mb, const char *proj, const char *cursor);

/**
 * ph_proto_job() - "job" for @proj; add partitions with ph_msg_str() and
 * then the overrun lines with ph_proto_overrun().
 */
void ph_proto_job(struct ph_msg *mb, const char *proj);

/** ph_proto_overrun() - an "overrun" line for the job in @mb. */
void ph_proto_overrun(struct ph_msg *mb, int64_t position, const char *kind, const char *reason,
		      int32_t backend);

#endif
