/*
 * log.h - one line per event-worthy thing, on stderr:
 *   2026-11-22T22:40:01.123Z INFO  balances pos=120 caught up
 * The Lua side writes through the same function (core.log), so every line
 * of the host has this format. One record is one line: whatever bytes the
 * caller passes, the `who` field and the message are escaped (ph_escape),
 * so text from events, stream names or scripts cannot start a forged line
 * or reach the terminal as a control sequence.
 */
#ifndef PH_LOG_H
#define PH_LOG_H

#include <stddef.h>

enum ph_level { PH_DEBUG, PH_INFO, PH_WARN, PH_ERROR };

/** PH_LOG_LINE - the longest log line in bytes, its newline included;
 * longer records are cut (never inside an escape or a UTF-8 character). */
#define PH_LOG_LINE 2048

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
 * ph_log_text() - write one log line of a message given as bytes.
 * @level: severity
 * @who: projection name, or NULL for "host"; @who_len bytes
 * @who_len: length of @who
 * @msg: the message, @msg_len bytes, escaped with ph_escape()
 * @msg_len: length of @msg
 *
 * One write() per line, so lines from the master and its workers (which
 * share stderr) do not interleave.
 */
void ph_log_text(enum ph_level level, const char *who, size_t who_len, const char *msg, size_t msg_len);

/**
 * ph_log_set_debug() - whether PH_DEBUG lines are written (default: not).
 */
void ph_log_set_debug(int on);

/**
 * ph_log() - write one log line (see ph_log_text()).
 * @level: severity
 * @who: projection name, or "host" for the process itself
 * @fmt: printf format of the message (no trailing newline)
 */
void ph_log(enum ph_level level, const char *who, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif
