/*
 * log.h - one line per event-worthy thing, on stderr, in one of two
 * formats chosen once per process (PROJHOST_LOG_FORMAT, read by
 * lua/projhost/config.lua and handed over with ph_log_set_format):
 *
 * text (the default), for people:
 *   2026-11-22T22:40:01.123Z INFO  balances pos=120 caught up
 * json, for log shippers: one object per line, absent fields left out:
 *   {"time":"2026-11-22T22:40:01.123Z","level":"info","projection":"balances",
 *    "position":120,"stream":"account-7","version":3,"message":"caught up"}
 *
 * A record is structured (level, who, message and the event's position,
 * stream and version when there is one) and this file alone turns it into
 * a line, for the master, the workers (core.log) and the CLI alike. One
 * record is one line: whatever bytes the caller passes, every field is
 * escaped (ph_escape for text; RFC 8259 with invalid UTF-8 replaced by
 * U+FFFD for json), so text from events, stream names or scripts cannot
 * start a forged line, break the JSON or reach a terminal as a control
 * sequence.
 */
#ifndef PH_LOG_H
#define PH_LOG_H

#include <stddef.h>
#include <time.h>

enum ph_level { PH_DEBUG, PH_INFO, PH_WARN, PH_ERROR };

/** enum ph_log_format - how records become lines (PROJHOST_LOG_FORMAT). */
enum ph_log_format { PH_LOG_TEXT, PH_LOG_JSON };

/** PH_LOG_LINE - the longest text line in bytes, its newline included;
 * longer records are cut (never inside an escape or a UTF-8 character). */
#define PH_LOG_LINE 2048

/** PH_LOG_JSON_LINE - the longest json line, its newline included: PIPE_BUF,
 * so a line written to a pipe arrives whole. It always holds the other
 * fields whole - a projection name of up to PH_LOG_JSON_WHO bytes (of the
 * characters names are made of), any stream name append accepts (1024
 * bytes, no C0 controls) - and only the message is cut, at a character;
 * the line stays valid JSON either way. */
#define PH_LOG_JSON_LINE 4096

/** PH_LOG_JSON_WHO - bytes of a projection name a json line keeps whole. */
#define PH_LOG_JSON_WHO 128

/* ph_log_fields.has */
#define PH_LOG_POSITION 1u
#define PH_LOG_VERSION 2u

/**
 * struct ph_log_fields - what a record says about an event besides its
 * message; every part is optional.
 * @has: PH_LOG_POSITION and/or PH_LOG_VERSION: which numbers are set
 * @position: the event's global position
 * @version: the event's version in its stream
 * @stream: the event's stream (any bytes), or NULL for none
 * @stream_len: length of @stream
 *
 * Text lines show the position as "pos=N " before the message (as they
 * always did) and leave stream and version out; json lines carry each as
 * a field of its own.
 */
struct ph_log_fields {
	unsigned has;
	long long position;
	long long version;
	const char *stream;
	size_t stream_len;
};

/**
 * ph_escape() - the host's one rule for showing untrusted text on a line:
 * \n, \t and \r become "\n", "\t" and "\r"; other C0 bytes and DEL become
 * "\xNN"; C1 controls in UTF-8 (U+0080..U+009F, bytes C2 80..C2 9F, which
 * terminals may obey like ESC [) become "\xc2\xNN"; a backslash becomes
 * "\\", so an escape in the input cannot pass for one made here. Every
 * other byte (UTF-8 included, valid or not) is copied as it is.
 * @dst: output buffer of @cap bytes (no NUL is written)
 * @cap: room in @dst
 * @src: input, @len bytes (may contain NULs)
 * @len: input length
 * @used: set to the input bytes consumed: @len, or less when @dst filled up;
 *        the output then ends before an escape or UTF-8 character that did
 *        not fit whole
 *
 * Return: bytes written to @dst (at most @cap).
 */
size_t ph_escape(char *dst, size_t cap, const char *src, size_t len, size_t *used);

/**
 * ph_json_escape() - @src as the inside of a JSON string (RFC 8259), valid
 * UTF-8 whatever the input: '"' and '\' are escaped, C0 controls become
 * \b \f \n \r \t or \u00XX, and so do DEL, the C1 controls U+0080..U+009F
 * and U+2028/U+2029 (JavaScript's line breaks); each byte that does not
 * belong to a well-formed UTF-8 sequence (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF) becomes one U+FFFD.
 * @dst: output buffer of @cap bytes (no NUL is written)
 * @cap: room in @dst
 * @src: input, @len bytes (may contain NULs)
 * @len: input length
 * @used: set to the input bytes consumed (less than @len when @dst filled
 *        up; the output then ends before an escape or character that did
 *        not fit whole); may be NULL
 *
 * Return: bytes written to @dst (at most @cap).
 */
size_t ph_json_escape(char *dst, size_t cap, const char *src, size_t len, size_t *used);

/**
 * ph_log_render() - one record as the line @format makes of it, newline
 * included (what ph_log_rec() writes; specs read it through core.log_line).
 * @line: output buffer; text uses at most PH_LOG_LINE bytes of it, json at
 *        most PH_LOG_JSON_LINE
 * @cap: room in @line: at least PH_LOG_JSON_LINE (less writes nothing)
 * @format: PH_LOG_TEXT or PH_LOG_JSON
 * @ts: the record's time (UTC)
 * @level: severity
 * @who: projection name; NULL, "host" or "worker" for the process itself
 *       (json says "process" instead of "projection" for those)
 * @who_len: length of @who
 * @f: the event's fields, or NULL for none
 * @msg: the message, @msg_len bytes
 * @msg_len: length of @msg
 *
 * Return: bytes written (0 when @cap is too small).
 */
size_t ph_log_render(char *line, size_t cap, enum ph_log_format format, const struct timespec *ts,
		     enum ph_level level, const char *who, size_t who_len, const struct ph_log_fields *f,
		     const char *msg, size_t msg_len);

/**
 * ph_log_set_format() - the format of every line this process writes from
 * now on (default PH_LOG_TEXT).
 */
void ph_log_set_format(enum ph_log_format format);

/**
 * ph_log_get_format() - the format set by ph_log_set_format().
 */
enum ph_log_format ph_log_get_format(void);

/**
 * ph_log_set_debug() - whether PH_DEBUG lines are written (default: not).
 */
void ph_log_set_debug(int on);

/**
 * ph_log_rec() - write one record as a line of the process's format.
 * @level: severity
 * @who: projection name, or NULL for "host"; @who_len bytes
 * @who_len: length of @who
 * @f: the event's position, stream and version, or NULL
 * @msg: the message, @msg_len bytes
 * @msg_len: length of @msg
 *
 * One write() per line, so lines from the master and its workers (which
 * share stderr) do not interleave.
 */
void ph_log_rec(enum ph_level level, const char *who, size_t who_len, const struct ph_log_fields *f,
		const char *msg, size_t msg_len);

/**
 * ph_log_at() - write one record with event fields, the message given by a
 * printf format.
 * @level: severity
 * @who: projection name, or "host" for the process itself
 * @f: the event's position, stream and version, or NULL
 * @fmt: printf format of the message (no trailing newline)
 */
void ph_log_at(enum ph_level level, const char *who, const struct ph_log_fields *f, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/**
 * ph_log() - write one log line (see ph_log_rec()), no event fields.
 * @level: severity
 * @who: projection name, or "host" for the process itself
 * @fmt: printf format of the message (no trailing newline)
 */
void ph_log(enum ph_level level, const char *who, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif
