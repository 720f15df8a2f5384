/*
 * proto.c - the master/worker messages (see proto.h).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"

static const char *const verbs[] = {
	[PH_V_END] = "",
	[PH_V_UNKNOWN] = "?",
	[PH_V_INIT] = "init",
	[PH_V_JOB] = "job",
	[PH_V_OVERRUN] = "overrun",
	[PH_V_FIND] = "find",
	[PH_V_RELOAD] = "reload",
	[PH_V_QUIT] = "quit",
	[PH_V_PROJ] = "proj",
	[PH_V_ERROR] = "error",
	[PH_V_READY] = "ready",
	[PH_V_DONE] = "done",
	[PH_V_PART] = "part",
	[PH_V_FOUND] = "found",
	[PH_V_RELIST] = "relist",
	[PH_V_FAILS] = "fails",
	[PH_V_DUE] = "due",
	[PH_V_FIRED] = "fired",
};

#define NVERBS (sizeof(verbs) / sizeof(verbs[0]))

const char *ph_proto_verb_name(enum ph_verb v)
{
	return (size_t)v < NVERBS ? verbs[v] : "?";
}

static enum ph_verb verb_of(const char *s)
{
	for (size_t i = PH_V_INIT; i < NVERBS; i++)
		if (strcmp(verbs[i], s) == 0)
			return (enum ph_verb)i;
	return PH_V_UNKNOWN;
}

size_t ph_proto_escaped_len(const char *s, size_t n)
{
	size_t len = n;

	for (size_t i = 0; i < n; i++)
		if (s[i] == '\\' || s[i] == '\t' || s[i] == '\n')
			len++;
	return len;
}

char *ph_proto_escape(char *dst, const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		switch (s[i]) {
		case '\\':
			*dst++ = '\\';
			*dst++ = '\\';
			break;
		case '\t':
			*dst++ = '\\';
			*dst++ = 't';
			break;
		case '\n':
			*dst++ = '\\';
			*dst++ = 'n';
			break;
		default:
			*dst++ = s[i];
		}
	}
	return dst;
}

size_t ph_proto_unescape(char *s)
{
	char *r = s, *w = s;

	while (*r) {
		if (r[0] == '\\' && (r[1] == '\\' || r[1] == 't' || r[1] == 'n')) {
			*w++ = r[1] == 't' ? '\t' : r[1] == 'n' ? '\n' : '\\';
			r += 2;
		} else {
			*w++ = *r++;
		}
	}
	*w = '\0';
	return (size_t)(w - s);
}

/* Room for @n more bytes (and a NUL). */
static int reserve(struct ph_msg *mb, size_t n)
{
	size_t c;
	char *b;

	if (mb->failed)
		return -1;
	if (mb->len + n + 1 <= mb->cap)
		return 0;
	c = mb->cap ? mb->cap : 256;
	while (c < mb->len + n + 1) {
		if (c > SIZE_MAX / 2) {
			mb->failed = 1;
			return -1;
		}
		c *= 2;
	}
	b = realloc(mb->buf, c);
	if (!b) {
		mb->failed = 1;
		return -1;
	}
	mb->buf = b;
	mb->cap = c;
	return 0;
}

void ph_msg_line(struct ph_msg *mb, enum ph_verb v)
{
	const char *name = ph_proto_verb_name(v);
	size_t n = strlen(name);

	if (reserve(mb, n + 1) != 0)
		return;
	if (mb->len)
		mb->buf[mb->len++] = '\n';
	memcpy(mb->buf + mb->len, name, n + 1);
	mb->len += n;
}

void ph_msg_field(struct ph_msg *mb, const char *s, size_t n)
{
	size_t e = ph_proto_escaped_len(s, n);

	if (reserve(mb, e + 1) != 0)
		return;
	mb->buf[mb->len++] = '\t';
	mb->len = (size_t)(ph_proto_escape(mb->buf + mb->len, s, n) - mb->buf);
	mb->buf[mb->len] = '\0';
}

void ph_msg_str(struct ph_msg *mb, const char *s)
{
	ph_msg_field(mb, s, strlen(s));
}

void ph_msg_int(struct ph_msg *mb, int64_t v)
{
	char b[32];
	int n = snprintf(b, sizeof(b), "%" PRId64, v);

	ph_msg_field(mb, b, (size_t)n);
}

void ph_msg_free(struct ph_msg *mb)
{
	free(mb->buf);
	memset(mb, 0, sizeof(*mb));
}

enum ph_verb ph_proto_next(char **cursor, char **f, int max, int *n)
{
	char *line = *cursor, *end, *p;
	enum ph_verb v;

	*n = 0;
	if (!line || !*line)
		return PH_V_END;
	end = strchr(line, '\n');
	if (end) {
		*end = '\0';
		*cursor = end + 1;
	} else {
		*cursor = line + strlen(line);
	}
	p = strchr(line, '\t');
	if (p)
		*p++ = '\0';
	v = verb_of(line);
	if (v == PH_V_UNKNOWN) {
		if (max > 0) {
			f[0] = line;
			*n = 1;
		}
		return v;
	}
	while (p && *n < max) {
		char *next = strchr(p, '\t');

		if (next)
			*next++ = '\0';
		ph_proto_unescape(p);
		f[(*n)++] = p;
		p = next;
	}
	return v;
}

enum ph_verb ph_proto_first(const char *msg)
{
	size_t n = strcspn(msg, "\t\n");

	if (!*msg)
		return PH_V_END;
	for (size_t i = PH_V_INIT; i < NVERBS; i++)
		if (strlen(verbs[i]) == n && strncmp(verbs[i], msg, n) == 0)
			return (enum ph_verb)i;
	return PH_V_UNKNOWN;
}

void ph_proto_init(struct ph_msg *mb, const char *dsn, const char *const *paths, int npaths)
{
	mb->len = 0;
	ph_msg_line(mb, PH_V_INIT);
	ph_msg_str(mb, dsn);
	for (int i = 0; i < npaths; i++)
		ph_msg_str(mb, paths[i]);
}

void ph_proto_find(struct ph_msg *mb, const char *proj, const char *cursor)
{
	mb->len = 0;
	ph_msg_line(mb, PH_V_FIND);
	ph_msg_str(mb, proj);
	ph_msg_str(mb, cursor);
}

void ph_proto_job(struct ph_msg *mb, const char *proj)
{
	mb->len = 0;
	ph_msg_line(mb, PH_V_JOB);
	ph_msg_str(mb, proj);
}

void ph_proto_overrun(struct ph_msg *mb, int64_t position, const char *kind, const char *reason,
		      int32_t backend)
{
	ph_msg_line(mb, PH_V_OVERRUN);
	ph_msg_int(mb, position);
	ph_msg_str(mb, kind);
	ph_msg_str(mb, reason);
	ph_msg_int(mb, backend);
}
