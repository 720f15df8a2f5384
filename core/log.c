/*
 * log.c - log lines on stderr, written with one write() so lines from the
 * master and its workers (which share stderr) do not interleave, and
 * escaped so that one record is always one line (see log.h).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

static const char *const names[] = { "DEBUG", "INFO ", "WARN ", "ERROR" };

/* Length of the UTF-8 character starting at s[0] when it is whole within
 * @len bytes (lead byte and its continuation bytes), else 1: a character is
 * copied or left out as a unit, never cut in two. */
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
	static const char hex[] = "0123456789abcdef";
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

/* off until the CLI reads PROJHOST_DEBUG (projhost.config) */
static int debug;

void ph_log_set_debug(int on)
{
	debug = on;
}

void ph_log_text(enum ph_level level, const char *who, size_t who_len, const char *msg, size_t msg_len)
{
	char line[PH_LOG_LINE];
	/* room for the text; one byte stays free for the newline */
	const size_t room = sizeof(line) - 1;
	struct timespec ts;
	struct tm tm;
	size_t n;
	int head;

	if (level == PH_DEBUG && !debug)
		return;
	if (!who) {
		who = "host";
		who_len = 4;
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	head = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s ",
			tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
			tm.tm_sec, ts.tv_nsec / 1000000, names[level]);
	n = head > 0 && (size_t)head < room ? (size_t)head : 0;
	n += ph_escape(line + n, room - n, who, who_len, NULL);
	if (n < room)
		line[n++] = ' ';
	n += ph_escape(line + n, room - n, msg, msg_len, NULL);
	line[n++] = '\n';
	if (write(2, line, n) < 0) {
		/* nowhere left to report it */
	}
}

void ph_log(enum ph_level level, const char *who, const char *fmt, ...)
{
	/* a message longer than a line is cut by ph_log_text anyway: every
	 * byte escapes to one or more */
	char msg[PH_LOG_LINE];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof(msg))
		n = (int)sizeof(msg) - 1;
	ph_log_text(level, who, who ? strlen(who) : 0, msg, (size_t)n);
}
