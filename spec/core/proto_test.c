/*
 * proto_test.c - checks of core/proto.c, run by spec/core/proto_spec.lua.
 *
 *   proto_test          prints "ok <name>" per check; exits non-zero at the
 *                       first failure
 *   proto_test parse    parses the message on stdin, prints one line per
 *                       message line: the verb, then each field in hex
 *   proto_test sample   prints a job message whose fields hold every byte
 *                       1..255 (for the Lua side to parse)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/frame.h"
#include "../../core/proto.h"
#include "check.h"

/* Every byte 1..255, and a field of a single byte b. */
static char every[256];

static void init_every(void)
{
	for (int b = 1; b < 256; b++)
		every[b - 1] = (char)b;
	every[255] = '\0';
}

static void escape_round_trips(void)
{
	char buf[1024], one[2] = { 0, 0 };

	for (int b = 1; b < 256; b++) {
		one[0] = (char)b;
		char *end = ph_proto_escape(buf, one, 1);

		*end = '\0';
		CHECK((size_t)(end - buf) == ph_proto_escaped_len(one, 1));
		CHECK(!strchr(buf, '\t') && !strchr(buf, '\n'));
		CHECK(ph_proto_unescape(buf) == 1 && (unsigned char)buf[0] == b);
	}
	*ph_proto_escape(buf, every, 255) = '\0';
	CHECK(!strchr(buf, '\t') && !strchr(buf, '\n'));
	CHECK(ph_proto_unescape(buf) == 255 && memcmp(buf, every, 255) == 0);
	/* literal escape sequences and a trailing backslash survive too */
	const char *tricky[] = { "\\t", "\\n", "\\\\", "\\", "a\\", "\\x", "\t\\t\n\\n" };

	for (size_t i = 0; i < sizeof(tricky) / sizeof(tricky[0]); i++) {
		size_t n = strlen(tricky[i]);

		*ph_proto_escape(buf, tricky[i], n) = '\0';
		CHECK(ph_proto_unescape(buf) == n && strcmp(buf, tricky[i]) == 0);
	}
	/* a backslash before any other byte is kept as it is */
	strcpy(buf, "a\\qb\\");
	CHECK(ph_proto_unescape(buf) == 5 && strcmp(buf, "a\\qb\\") == 0);
	puts("ok escape and unescape round-trip every byte 1..255");
}

/* Build one line of @v with @nf fields (field k holds @val[k]), parse it back. */
static void line_round_trip(enum ph_verb v, int nf, const char **val)
{
	struct ph_msg mb = { 0 };
	char *f[16], *cur;
	int n;

	ph_msg_line(&mb, v);
	for (int k = 0; k < nf; k++)
		ph_msg_str(&mb, val[k]);
	/* a second line, so that the first one must end where it should */
	ph_msg_line(&mb, PH_V_RELIST);
	CHECK(!mb.failed);
	CHECK(ph_proto_first(mb.buf) == v);
	cur = mb.buf;
	CHECK(ph_proto_next(&cur, f, 16, &n) == v);
	CHECK(n == nf);
	for (int k = 0; k < nf; k++)
		CHECK(strcmp(f[k], val[k]) == 0);
	CHECK(ph_proto_next(&cur, f, 16, &n) == PH_V_RELIST && n == 0);
	CHECK(ph_proto_next(&cur, f, 16, &n) == PH_V_END);
	ph_msg_free(&mb);
}

/* Fields per verb, as in proto.h. */
static const struct { enum ph_verb v; int nf; } shapes[] = {
	{ PH_V_INIT, 3 }, { PH_V_JOB, 3 }, { PH_V_OVERRUN, 3 }, { PH_V_FIND, 2 },
	{ PH_V_RELOAD, 0 }, { PH_V_QUIT, 0 }, { PH_V_PROJ, 6 }, { PH_V_ERROR, 2 },
	{ PH_V_READY, 0 }, { PH_V_DONE, 2 }, { PH_V_PART, 3 }, { PH_V_PART, 1 },
	{ PH_V_FOUND, 3 }, { PH_V_RELIST, 0 }, { PH_V_FAILS, 3 },
	{ PH_V_DUE, 2 }, { PH_V_FIRED, 2 },
};

static void every_message_round_trips(void)
{
	char one[2] = { 0, 0 };

	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
		for (int k = 0; k < shapes[s].nf; k++) {
			const char *val[8] = { "x", "", "y", "", "z", "" };

			/* every byte alone in field k, then all of them, then empty */
			for (int b = 1; b < 256; b++) {
				one[0] = (char)b;
				val[k] = one;
				line_round_trip(shapes[s].v, shapes[s].nf, val);
			}
			val[k] = every;
			line_round_trip(shapes[s].v, shapes[s].nf, val);
			val[k] = "";
			line_round_trip(shapes[s].v, shapes[s].nf, val);
		}
		if (!shapes[s].nf)
			line_round_trip(shapes[s].v, 0, NULL);
	}
	puts("ok every field of every message carries every byte 1..255");
}

static void master_messages(void)
{
	struct ph_msg mb = { 0 };
	const char *paths[] = { every, "p\tq", "" };
	char *f[8], *cur;
	int n;

	ph_proto_init(&mb, "host=/x\tdbname=\\n", paths, 3);
	cur = mb.buf;
	CHECK(ph_proto_next(&cur, f, 8, &n) == PH_V_INIT && n == 4);
	CHECK(strcmp(f[0], "host=/x\tdbname=\\n") == 0 && strcmp(f[1], every) == 0);
	CHECK(strcmp(f[2], "p\tq") == 0 && strcmp(f[3], "") == 0);
	CHECK(ph_proto_next(&cur, f, 8, &n) == PH_V_END);

	ph_proto_find(&mb, "p", every);	/* reuses the buffer: a new message */
	cur = mb.buf;
	CHECK(ph_proto_next(&cur, f, 8, &n) == PH_V_FIND && n == 2 && strcmp(f[1], every) == 0);

	ph_proto_job(&mb, "p\n");
	ph_msg_str(&mb, "");
	ph_msg_str(&mb, every);
	ph_proto_overrun(&mb, 9007199254740993LL, "on_error", "died\n(signal 11)\t\\", 0);
	cur = mb.buf;
	CHECK(ph_proto_next(&cur, f, 8, &n) == PH_V_JOB && n == 3);
	CHECK(strcmp(f[0], "p\n") == 0 && strcmp(f[1], "") == 0 && strcmp(f[2], every) == 0);
	CHECK(ph_proto_next(&cur, f, 8, &n) == PH_V_OVERRUN && n == 4);
	CHECK(strcmp(f[0], "9007199254740993") == 0 && strcmp(f[1], "on_error") == 0);
	CHECK(strcmp(f[2], "died\n(signal 11)\t\\") == 0 && strcmp(f[3], "0") == 0);
	CHECK(ph_proto_next(&cur, f, 8, &n) == PH_V_END);
	ph_msg_free(&mb);

	/* an unknown verb, and fields past @max dropped */
	char unk[] = "bogus\ta\tb\nready";
	cur = unk;
	CHECK(ph_proto_first(unk) == PH_V_UNKNOWN);
	CHECK(ph_proto_next(&cur, f, 8, &n) == PH_V_UNKNOWN && n == 1 && strcmp(f[0], "bogus") == 0);
	CHECK(ph_proto_next(&cur, f, 8, &n) == PH_V_READY && n == 0);
	char many[] = "part\ta\tb\tc\td";
	cur = many;
	CHECK(ph_proto_next(&cur, f, 2, &n) == PH_V_PART && n == 2 && strcmp(f[1], "b") == 0);
	CHECK(ph_proto_first("") == PH_V_END && ph_proto_first("readyx") == PH_V_UNKNOWN);
	puts("ok init, find, job and overrun as the master sends them");
}

static void hex(const char *s)
{
	for (; *s; s++)
		printf("%02x", (unsigned char)*s);
}

static int parse_stdin(void)
{
	static char buf[PH_FRAME_MAX + 1];
	size_t len = fread(buf, 1, PH_FRAME_MAX, stdin);
	char *f[64], *cur = buf;
	int n;
	enum ph_verb v;

	buf[len] = '\0';
	while ((v = ph_proto_next(&cur, f, 64, &n)) != PH_V_END) {
		printf("%s", ph_proto_verb_name(v));
		for (int k = 0; k < n; k++) {
			putchar(' ');
			putchar('=');
			hex(f[k]);
		}
		putchar('\n');
	}
	return 0;
}

static int sample(void)
{
	struct ph_msg mb = { 0 };

	ph_proto_job(&mb, every);
	ph_msg_str(&mb, "");
	ph_msg_str(&mb, every);
	ph_proto_overrun(&mb, 42, "sql", every, 2147483647);
	fwrite(mb.buf, 1, mb.len, stdout);
	ph_msg_free(&mb);
	return 0;
}

int main(int argc, char **argv)
{
	init_every();
	if (argc > 1 && strcmp(argv[1], "parse") == 0)
		return parse_stdin();
	if (argc > 1 && strcmp(argv[1], "sample") == 0)
		return sample();
	escape_round_trips();
	every_message_round_trips();
	master_messages();
	return 0;
}
