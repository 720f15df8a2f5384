/*
 * log.c - log records on stderr, as text or json lines (see log.h),
 * written with one write() so lines from the master and its workers
 * (which share stderr) do not interleave, and escaped so that one record
 * is always one line.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

static const char *const names[] = { "DEBUG", "INFO ", "WARN ", "ERROR" };
static const char *const json_names[] = { "debug", "info", "warn", "error" };
static const char hex[] = "0123456789abcdef";

/* Length of the UTF-8 character starting at s[0] when it is whole within
 * @len bytes (lead byte and its continuation bytes), else 1: a character is
 * copied or left out as a unit, never cut in two. Lax on purpose (the text
 * format copies what it does not escape); JSON uses utf8_strict. */
static size_t utf8_unit(const unsigned char *s, size_t len)
{
	size_t n = s[0] >= 0xF0 && s[0] <= 0xF4 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC2 ? 2 : 1;

	if (n > len)
		return 1;
	for (size_t i = 1; i < n; i++)
		if ((s[i] & 0xC0) != 0x80)
			return 1;
	return n;
}

size_t ph_escape(char *dst, size_t cap, const char *src, size_t len, size_t *used)
{
	const unsigned char *s = (const unsigned char *)src;
	size_t i = 0, o = 0;

	while (i < len) {
		unsigned char c = s[i];
		char esc[8];
		size_t in = 1, out;

		if (c == '\n' || c == '\t' || c == '\r' || c == '\\') {
			esc[0] = '\\';
			esc[1] = c == '\n' ? 'n' : c == '\t' ? 't' : c == '\r' ? 'r' : '\\';
			out = 2;
		} else if (c < 0x20 || c == 0x7f) {
			memcpy(esc, (char[]){ '\\', 'x', hex[c >> 4], hex[c & 15] }, 4);
			out = 4;
		} else if (c < 0x80) {
			esc[0] = (char)c;
			out = 1;
		} else {
			in = utf8_unit(s + i, len - i);
			if (in == 2 && c == 0xC2 && s[i + 1] < 0xA0) {
				memcpy(esc, (char[]){ '\\', 'x', 'c', '2', '\\', 'x', hex[s[i + 1] >> 4],
						      hex[s[i + 1] & 15] }, 8);
				out = 8;
			} else {
				memcpy(esc, s + i, in);
				out = in;
			}
		}
		if (out > cap - o)
			break;
		memcpy(dst + o, esc, out);
		o += out;
		i += in;
	}
	if (used)
		*used = i;
	return o;
}

/* The code point of the well-formed UTF-8 sequence at s[0] (RFC 3629
 * table 3-7: the second byte's range depends on the lead, which rules out
 * overlong forms, surrogates and anything above U+10FFFF) and its length
 * in *n; -1 when s[0] starts no such sequence within @len bytes. */
static long utf8_strict(const unsigned char *s, size_t len, size_t *n)
{
	unsigned char c = s[0], lo = 0x80, hi = 0xBF;
	size_t k;
	long cp;

	if (c >= 0xC2 && c <= 0xDF) {
		k = 2;
		cp = c & 0x1F;
	} else if (c >= 0xE0 && c <= 0xEF) {
		k = 3;
		cp = c & 0x0F;
		if (c == 0xE0)
			lo = 0xA0;
		else if (c == 0xED)
			hi = 0x9F;
	} else if (c >= 0xF0 && c <= 0xF4) {
		k = 4;
		cp = c & 0x07;
		if (c == 0xF0)
			lo = 0x90;
		else if (c == 0xF4)
			hi = 0x8F;
	} else {
		return -1;
	}
	if (k > len || s[1] < lo || s[1] > hi)
		return -1;
	for (size_t i = 1; i < k; i++) {
		if ((s[i] & 0xC0) != 0x80)
			return -1;
		cp = cp << 6 | (s[i] & 0x3F);
	}
	*n = k;
	return cp;
}

size_t ph_json_escape(char *dst, size_t cap, const char *src, size_t len, size_t *used)
{
	const unsigned char *s = (const unsigned char *)src;
	size_t i = 0, o = 0;

	while (i < len) {
		unsigned char c = s[i];
		char esc[6];
		size_t in = 1, out;
		long cp = c;

		if (c >= 0x80) {
			cp = utf8_strict(s + i, len - i, &in);
			if (cp < 0) {
				/* one U+FFFD per byte that is not part of a character */
				in = 1;
				cp = 0xFFFD;
			}
		}
		if (cp == '"' || cp == '\\') {
			esc[0] = '\\';
			esc[1] = (char)cp;
			out = 2;
		} else if (cp == '\b' || cp == '\f' || cp == '\n' || cp == '\r' || cp == '\t') {
			esc[0] = '\\';
			esc[1] = cp == '\b' ? 'b' : cp == '\f' ? 'f' : cp == '\n' ? 'n' : cp == '\r' ? 'r' : 't';
			out = 2;
		} else if (cp < 0x20 || (cp >= 0x7f && cp <= 0x9f) || cp == 0x2028 || cp == 0x2029) {
			memcpy(esc, (char[]){ '\\', 'u', hex[cp >> 12 & 15], hex[cp >> 8 & 15], hex[cp >> 4 & 15],
					      hex[cp & 15] }, 6);
			out = 6;
		} else if (cp == 0xFFFD && in == 1) {
			memcpy(esc, "\xEF\xBF\xBD", 3);
			out = 3;
		} else if (cp < 0x80) {
			esc[0] = (char)cp;
			out = 1;
		} else {
			/* a well-formed character: its own bytes */
			if (in > cap - o)
				break;
			memcpy(dst + o, s + i, in);
			o += in;
			i += in;
			continue;
		}
		if (out > cap - o)
			break;
		memcpy(dst + o, esc, out);
		o += out;
		i += in;
	}
	if (used)
		*used = i;
	return o;
}

/* off until the CLI reads PROJHOST_DEBUG and PROJHOST_LOG_FORMAT (projhost.config) */
static int debug;
static enum ph_log_format format;

void ph_log_set_debug(int on)
{
	debug = on;
}

void ph_log_set_format(enum ph_log_format f)
{
	format = f == PH_LOG_JSON ? PH_LOG_JSON : PH_LOG_TEXT;
}

enum ph_log_format ph_log_get_format(void)
{
	return format;
}

/* the process's own lines, not a projection's */
static int is_process(const char *who, size_t len)
{
	return (len == 4 && !memcmp(who, "host", 4)) || (len == 6 && !memcmp(who, "worker", 6));
}

/* "2026-11-22T22:40:01.123Z" (24 bytes) into @buf of 32 */
static int timestamp(char *buf, const struct timespec *ts)
{
	struct tm tm;
	long ms = ts->tv_nsec / 1000000;

	gmtime_r(&ts->tv_sec, &tm);
	return snprintf(buf, 32, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", (tm.tm_year + 1900) % 10000,
			(tm.tm_mon + 1) % 100, tm.tm_mday % 100, tm.tm_hour % 100, tm.tm_min % 100,
			tm.tm_sec % 100, ms >= 0 && ms < 1000 ? ms : 0);
}

static size_t render_text(char *line, const char *when, enum ph_level level, const char *who,
			  size_t who_len, const struct ph_log_fields *f, const char *msg, size_t msg_len)
{
	/* room for the text; one byte stays free for the newline */
	const size_t room = PH_LOG_LINE - 1;
	size_t n;
	int head;

	head = snprintf(line, room + 1, "%s %s ", when, names[level]);
	n = head > 0 && (size_t)head < room ? (size_t)head : 0;
	n += ph_escape(line + n, room - n, who, who_len, NULL);
	if (n < room)
		line[n++] = ' ';
	if (f && (f->has & PH_LOG_POSITION)) {
		char pos[32];
		int k = snprintf(pos, sizeof(pos), "pos=%lld ", f->position);

		if (k > 0 && (size_t)k <= room - n) {
			memcpy(line + n, pos, (size_t)k);
			n += (size_t)k;
		}
	}
	n += ph_escape(line + n, room - n, msg, msg_len, NULL);
	line[n++] = '\n';
	return n;
}

/* Room a json line keeps for each field before the message: with these,
 * every field but the message is whole (see PH_LOG_JSON_LINE). The
 * fixed parts: {"time":"<24..31>","level":"<5>" = 50..57, ,"projection":"" = 16,
 * ,"position":<20> = 32, ,"stream":"" = 12, ,"version":<20> = 31,
 * ,"message":"" and } = 14. */
#define JSON_WHO_ROOM (3 * PH_LOG_JSON_WHO)
#define JSON_STREAM_ROOM (3 * 1024)
#define JSON_FIXED (50 + 16 + 32 + 12 + 31 + 14)
_Static_assert(JSON_FIXED + JSON_WHO_ROOM + JSON_STREAM_ROOM + 256 < PH_LOG_JSON_LINE,
	       "a json line must keep room for a message");

/* key + '"' + escaped @s (at most @max bytes of output) + '"' at line[n] */
static size_t json_string(char *line, size_t n, size_t max, const char *key, const char *s, size_t len)
{
	size_t k = strlen(key);

	memcpy(line + n, key, k);
	n += k;
	n += ph_json_escape(line + n, max, s, len, NULL);
	line[n++] = '"';
	return n;
}

static size_t render_json(char *line, const char *when, enum ph_level level, const char *who,
			  size_t who_len, const struct ph_log_fields *f, const char *msg, size_t msg_len)
{
	/* one byte stays free for the newline */
	const size_t room = PH_LOG_JSON_LINE - 1;
	size_t n;

	/* every field fits by construction (JSON_FIXED) */
	n = (size_t)snprintf(line, 64, "{\"time\":\"%s\",\"level\":\"%s\"", when, json_names[level]);
	if (is_process(who, who_len))
		n = json_string(line, n, JSON_WHO_ROOM, ",\"process\":\"", who, who_len);
	else
		n = json_string(line, n, JSON_WHO_ROOM, ",\"projection\":\"", who, who_len);
	if (f && (f->has & PH_LOG_POSITION))
		n += (size_t)snprintf(line + n, 33, ",\"position\":%lld", f->position);
	if (f && f->stream)
		n = json_string(line, n, JSON_STREAM_ROOM, ",\"stream\":\"", f->stream, f->stream_len);
	if (f && (f->has & PH_LOG_VERSION))
		n += (size_t)snprintf(line + n, 32, ",\"version\":%lld", f->version);
	/* the message gets the rest, less '"', '}' */
	memcpy(line + n, ",\"message\":\"", 12);
	n += 12;
	n += ph_json_escape(line + n, room - n - 2, msg, msg_len, NULL);
	line[n++] = '"';
	line[n++] = '}';
	line[n++] = '\n';
	return n;
}

size_t ph_log_render(char *line, size_t cap, enum ph_log_format fmt, const struct timespec *ts,
		     enum ph_level level, const char *who, size_t who_len, const struct ph_log_fields *f,
		     const char *msg, size_t msg_len)
{
	char when[32];

	if (cap < PH_LOG_JSON_LINE || level < PH_DEBUG || level > PH_ERROR)
		return 0;
	if (!who) {
		who = "host";
		who_len = 4;
	}
	timestamp(when, ts);
	if (fmt == PH_LOG_JSON)
		return render_json(line, when, level, who, who_len, f, msg, msg_len);
	return render_text(line, when, level, who, who_len, f, msg, msg_len);
}

void ph_log_rec(enum ph_level level, const char *who, size_t who_len, const struct ph_log_fields *f,
		const char *msg, size_t msg_len)
{
	char line[PH_LOG_JSON_LINE];
	struct timespec ts;
	size_t n;

	if (level == PH_DEBUG && !debug)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	n = ph_log_render(line, sizeof(line), format, &ts, level, who, who_len, f, msg, msg_len);
	if (n && write(2, line, n) < 0) {
		/* nowhere left to report it */
	}
}

static void log_va(enum ph_level level, const char *who, const struct ph_log_fields *f, const char *fmt,
		   va_list ap)
{
	/* a message longer than a line is cut by the renderer anyway: every
	 * byte escapes to one or more */
	char msg[PH_LOG_JSON_LINE];
	int n = vsnprintf(msg, sizeof(msg), fmt, ap);

	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof(msg))
		n = (int)sizeof(msg) - 1;
	ph_log_rec(level, who, who ? strlen(who) : 0, f, msg, (size_t)n);
}

void ph_log_at(enum ph_level level, const char *who, const struct ph_log_fields *f, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_va(level, who, f, fmt, ap);
	va_end(ap);
}

void ph_log(enum ph_level level, const char *who, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_va(level, who, NULL, fmt, ap);
	va_end(ap);
}
