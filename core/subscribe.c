/*
 * subscribe.c - see subscribe.h.
 *
 * One shared head H = (tx, pos): every live subscriber has been given the
 * events of its source up to H. A wake-up reads the events after H below
 * the horizon (one read, every source) and hands each subscriber the ones
 * it wants. A resuming subscriber reads its own source from its token up
 * to H (all final: each is below the horizon that read H), and joins the
 * live ones once a short page got it to the H of that moment.
 *
 * The SQL is the worker's page read (lua/projhost/reads.lua, page_sql):
 * the same horizon condition, the same (transaction_id, global_position)
 * order and index ranges, the category term of the category index. It is
 * kept here as text because the master is C and runs no Lua, and the
 * statements differ (an upper bound, a JSON column, the held-back probe
 * folded in); reads.lua's header explains the index choices both rely on.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "log.h"
#include "subscribe.h"
#include "surface.h"

#define COLS "e.transaction_id::text, e.global_position, e.stream_id, e.event_type," \
	" json_build_object('id', e.event_id, 'stream', e.stream_id, 'version', e.stream_version," \
	" 'position', e.global_position, 'type', e.event_type, 'data', e.data, 'metadata', e.metadata," \
	" 'time', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text"

/* Where "live" starts: nothing at or after the horizon is final yet. */
static const char HEAD_SQL[] = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text";

/* The shared read after the head, and whether committed events wait above
 * the horizon (an older transaction still runs: read again soon, since it
 * may never NOTIFY) - one statement, one snapshot. $1 $2 head, $3 page. */
static const char LIVE_SQL[] = "SELECT h.held, " COLS " FROM (SELECT (SELECT 1 FROM projhost.events"
	" WHERE transaction_id >= pg_snapshot_xmin(pg_current_snapshot()) ORDER BY transaction_id LIMIT 1)"
	" IS NOT NULL AS held) h LEFT JOIN LATERAL (SELECT * FROM projhost.events"
	" WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
	" AND (transaction_id, global_position) > ($1::xid8, $2::bigint)"
	" ORDER BY transaction_id, global_position LIMIT $3) e ON true"
	" ORDER BY e.transaction_id, e.global_position";

/* A resuming subscriber's page: $1 $2 its cursor, $3 $4 the head, $5 page,
 * then the source's terms. */
static const char CATCHUP_HEAD[] = "SELECT " COLS " FROM projhost.events e"
	" WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
	" AND (e.transaction_id, e.global_position) > ($1::xid8, $2::bigint)"
	" AND (e.transaction_id, e.global_position) <= ($3::xid8, $4::bigint)";

enum kind { K_ALL, K_CATEGORY, K_STREAM };
enum state { S_WAIT, S_CATCHUP, S_LIVE, S_DONE };

struct pos {
	unsigned long long tx;
	long long pos;
};

struct sub {
	struct ph_subs *S;
	struct ph_http_req *req;	/* NULL once gone */
	enum kind kind;
	char *value, *category;		/* the stream's or category's name; the stream's category */
	char *types;			/* "a,b" as given, NULL: any */
	char **type;
	int ntypes;
	enum state state;
	struct pos cur;			/* the last event given (or where it started) */
	struct pos bound;		/* the head its running page reads to */
	int busy, dead, ended;
	int over;			/* behind by more than PH_SUB_BUFFER before this read */
	char *buf;
	size_t off, len, cap;
	struct sub *prev, *next;
};

struct ph_subs {
	uv_loop_t *loop;
	struct ph_surface *s;
	struct sub *subs;
	int n;
	int head_known, head_asked;
	struct pos head;
	int reading, again;
	uv_timer_t *held, *beat;
	unsigned held_ms;
	unsigned long long overflows, delivered, reads;
	int failing;			/* the last read failed (logged once per streak) */
};

static int cmp(struct pos a, struct pos b)
{
	if (a.tx != b.tx)
		return a.tx < b.tx ? -1 : 1;
	return a.pos < b.pos ? -1 : a.pos > b.pos;
}

static size_t pending(const struct sub *u)
{
	return u->len - u->off;
}

static void put(struct sub *u, const char *s, size_t n)
{
	if (u->len + n + 1 > u->cap) {
		size_t cap = u->cap ? u->cap : 4096;
		char *b;

		if (u->off) {
			memmove(u->buf, u->buf + u->off, u->len - u->off);
			u->len -= u->off;
			u->off = 0;
		}
		while (cap < u->len + n + 1)
			cap *= 2;
		if (cap != u->cap) {
			if (!(b = realloc(u->buf, cap))) {
				/* out of memory: this subscriber ends (it resumes from its token) */
				u->ended = 1;
				u->state = S_DONE;
				return;
			}
			u->buf = b;
			u->cap = cap;
		}
	}
	memcpy(u->buf + u->len, s, n);
	u->len += n;
}

static void wake_stream(struct sub *u)
{
	if (u->req)
		ph_http_stream_wake(u->req);
}

static void sub_free(struct sub *u)
{
	free(u->value);
	free(u->category);
	free(u->types);
	free(u->type);
	free(u->buf);
	free(u);
}

static int wants(const struct sub *u, const char *stream, const char *type)
{
	if (u->kind == K_STREAM && strcmp(stream, u->value) != 0)
		return 0;
	if (u->kind == K_CATEGORY) {
		size_t n = strcspn(stream, "-");

		if (strlen(u->value) != n || memcmp(stream, u->value, n) != 0)
			return 0;
	}
	if (!u->ntypes)
		return 1;
	for (int i = 0; i < u->ntypes; i++)
		if (strcmp(u->type[i], type) == 0)
			return 1;
	return 0;
}

/* One row (tx, pos, stream, type, doc from column c) as SSE text. */
static void format(struct ph_buf *b, PGresult *r, int i, int c)
{
	const char *type = PQgetvalue(r, i, c + 3), *doc = PQgetvalue(r, i, c + 4);

	ph_buf_printf(b, "id: %s.%s\n", PQgetvalue(r, i, c), PQgetvalue(r, i, c + 1));
	/* a CR or LF would end the field: the type is still in the data */
	if (*type && !strpbrk(type, "\r\n")) {
		ph_buf_add(b, "event: ", 7);
		ph_buf_add(b, type, strlen(type));
		ph_buf_add(b, "\n", 1);
	}
	ph_buf_add(b, "data: ", 6);
	/* JSON text holds CR/LF only as whitespace (strings escape them): a space */
	for (const char *p = doc; *p;) {
		size_t n = strcspn(p, "\r\n");

		ph_buf_add(b, p, n);
		p += n;
		if (*p) {
			ph_buf_add(b, " ", 1);
			p++;
		}
	}
	ph_buf_add(b, "\n\n", 2);
}

static struct pos row_pos(PGresult *r, int i, int c)
{
	struct pos p;

	p.tx = strtoull(PQgetvalue(r, i, c), NULL, 10);
	p.pos = strtoll(PQgetvalue(r, i, c + 1), NULL, 10);
	return p;
}

static void overflow(struct sub *u)
{
	char msg[96];
	int n = snprintf(msg, sizeof(msg), "event: overflow\ndata: {\"last\":\"%llu.%lld\"}\n\n", u->cur.tx,
			 u->cur.pos);

	u->S->overflows++;
	ph_log(PH_INFO, "host", "subscriber fell %d bytes behind; disconnecting it (last token %llu.%lld)",
	       PH_SUB_BUFFER, u->cur.tx, u->cur.pos);
	put(u, msg, (size_t)n);
	u->state = S_DONE;
	u->ended = 1;
}

static void step(struct sub *u);
static void live_read(struct ph_subs *S);

static void join(struct sub *u)
{
	static const char marker[] = "event: caught_up\ndata: {\"caught_up\":true}\n\n";

	put(u, marker, sizeof(marker) - 1);
	if (u->state == S_CATCHUP)
		u->state = S_LIVE;
}

/* ---- catching up ---- */

static void caught(void *arg, PGresult *r)
{
	struct sub *u = arg;
	int n;

	u->busy = 0;
	if (u->dead) {
		sub_free(u);
		return;
	}
	if (!r || PQresultStatus(r) != PGRES_TUPLES_OK) {
		/* tried again at the next wake-up or heartbeat */
		if (r)
			ph_log(PH_WARN, "host", "subscriber catch-up read: %s", PQresultErrorMessage(r));
		return;
	}
	if (u->state != S_CATCHUP)
		return;
	n = PQntuples(r);
	for (int i = 0; i < n; i++) {
		struct ph_buf b = { 0 };

		format(&b, r, i, 0);
		if (!b.failed)
			put(u, b.s, b.len);
		ph_buf_free(&b);
		u->cur = row_pos(r, i, 0);
	}
	u->S->delivered += (unsigned long long)n;
	if (n < PH_SUB_CATCHUP_PAGE && cmp(u->cur, u->bound) < 0)
		u->cur = u->bound;	/* everything of its source up to the bound is given */
	if (n < PH_SUB_CATCHUP_PAGE && cmp(u->cur, u->S->head) == 0)
		join(u);
	else
		step(u);
	wake_stream(u);
}

/* Read the next page, if its buffer has room and it is behind the head. */
static void step(struct sub *u)
{
	struct ph_subs *S = u->S;
	char p[7][24];
	const char *params[7];
	char sql[sizeof(CATCHUP_HEAD) + 256];
	int np = 5, c;

	if (u->busy || u->state != S_CATCHUP || !S->head_known || pending(u) >= PH_SUB_BUFFER / 2)
		return;
	c = cmp(u->cur, S->head);
	if (c > 0)
		return;		/* a token ahead of the head: wait for the head to pass it */
	if (c == 0) {
		join(u);
		wake_stream(u);
		return;
	}
	snprintf(p[0], sizeof(p[0]), "%llu", u->cur.tx);
	snprintf(p[1], sizeof(p[1]), "%lld", u->cur.pos);
	snprintf(p[2], sizeof(p[2]), "%llu", S->head.tx);
	snprintf(p[3], sizeof(p[3]), "%lld", S->head.pos);
	snprintf(p[4], sizeof(p[4]), "%d", PH_SUB_CATCHUP_PAGE);
	for (int i = 0; i < 5; i++)
		params[i] = p[i];
	strcpy(sql, CATCHUP_HEAD);
	if (u->kind != K_ALL) {
		/* the category term lets the category index serve the range */
		strcat(sql, " AND split_part(e.stream_id, '-', 1) = $6");
		params[np++] = u->kind == K_STREAM ? u->category : u->value;
		if (u->kind == K_STREAM) {
			strcat(sql, " AND e.stream_id = $7");
			params[np++] = u->value;
		}
	}
	if (u->types) {
		snprintf(sql + strlen(sql), sizeof(sql) - strlen(sql),
			 " AND e.event_type = ANY(string_to_array($%d, ','))", np + 1);
		params[np++] = u->types;
	}
	strcat(sql, " ORDER BY e.transaction_id, e.global_position LIMIT $5");
	u->bound = S->head;
	if (ph_surface_query(S->s, sql, np, params, caught, u) == 0)
		u->busy = 1;
}

/* ---- the head ---- */

static void on_head(void *arg, PGresult *r)
{
	struct ph_subs *S = arg;

	S->head_asked = 0;
	if (!r || PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1)
		return;		/* asked again at the next wake-up */
	if (!S->n || S->head_known)
		return;
	S->head.tx = strtoull(PQgetvalue(r, 0, 0), NULL, 10);
	S->head.pos = 0;
	S->head_known = 1;
	for (struct sub *u = S->subs; u; u = u->next) {
		if (u->state == S_WAIT) {
			u->cur = S->head;
			u->state = S_LIVE;
			put(u, ": subscribed\n\n", 14);
			wake_stream(u);
		} else {
			step(u);
		}
	}
}

static void ask_head(struct ph_subs *S)
{
	if (S->head_asked || S->head_known || !S->n)
		return;
	if (ph_surface_query(S->s, HEAD_SQL, 0, NULL, on_head, S) == 0)
		S->head_asked = 1;
}

/* ---- the shared read ---- */

static void on_held(uv_timer_t *t)
{
	live_read(t->data);
}

static void on_live(void *arg, PGresult *r)
{
	struct ph_subs *S = arg;
	int n, events = 0, held;

	S->reading = 0;
	if (!r)
		return;
	if (PQresultStatus(r) != PGRES_TUPLES_OK || PQnfields(r) != 6) {
		if (!S->failing++)
			ph_log(PH_WARN, "host", "subscribers' read: %s", PQresultErrorMessage(r));
		return;
	}
	S->failing = 0;
	if (!S->head_known)
		return;		/* every subscriber left meanwhile */
	n = PQntuples(r);
	held = n > 0 && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
	/* judged by what was unsent before this read, so that a client that
	 * keeps up is never cut off by one big page (memory: the buffer plus
	 * one page at most) */
	for (struct sub *u = S->subs; u; u = u->next)
		u->over = pending(u) > PH_SUB_BUFFER;
	for (int i = 0; i < n; i++) {
		const char *stream, *type;
		struct ph_buf b = { 0 };
		struct pos p;

		if (PQgetisnull(r, i, 1))
			continue;
		events++;
		p = row_pos(r, i, 1);
		stream = PQgetvalue(r, i, 3);
		type = PQgetvalue(r, i, 4);
		for (struct sub *u = S->subs; u; u = u->next) {
			if (u->state != S_LIVE || !wants(u, stream, type))
				continue;
			if (!b.len)
				format(&b, r, i, 1);
			if (b.failed)
				break;
			if (u->over) {
				overflow(u);
				continue;
			}
			put(u, b.s, b.len);
			u->cur = p;
			S->delivered++;
		}
		ph_buf_free(&b);
		S->head = p;
	}
	for (struct sub *u = S->subs; u; u = u->next) {
		if (pending(u))
			wake_stream(u);
		step(u);	/* the head moved */
	}
	if (events == PH_SUB_PAGE) {
		S->again = 1;
	} else if (held) {
		/* committed events wait behind an older transaction that may never
		 * NOTIFY: look again soon, backing off */
		S->held_ms = S->held_ms ? (S->held_ms * 2 > 1000 ? 1000 : S->held_ms * 2) : 5;
		uv_timer_start(S->held, on_held, S->held_ms, 0);
	} else {
		S->held_ms = 0;
	}
	if (S->again) {
		S->again = 0;
		live_read(S);
	}
}

static void live_read(struct ph_subs *S)
{
	char p[3][24];
	const char *params[3] = { p[0], p[1], p[2] };

	if (!S->n)
		return;
	if (!S->head_known) {
		ask_head(S);
		return;
	}
	if (S->reading) {
		S->again = 1;
		return;
	}
	snprintf(p[0], sizeof(p[0]), "%llu", S->head.tx);
	snprintf(p[1], sizeof(p[1]), "%lld", S->head.pos);
	snprintf(p[2], sizeof(p[2]), "%d", PH_SUB_PAGE);
	if (ph_surface_query(S->s, LIVE_SQL, 3, params, on_live, S) == 0) {
		S->reading = 1;
		S->reads++;
	}
}

void ph_subs_wake(struct ph_subs *S)
{
	if (S)
		live_read(S);
}

/* ---- the HTTP side ---- */

static ssize_t pull(void *arg, char *buf, size_t max)
{
	struct sub *u = arg;
	size_t n = pending(u);

	if (!n)
		return u->ended ? -1 : 0;
	if (n > max)
		n = max;
	memcpy(buf, u->buf + u->off, n);
	u->off += n;
	if (u->off == u->len)
		u->off = u->len = 0;
	step(u);
	return (ssize_t)n;
}

static void gone(void *arg)
{
	struct sub *u = arg;
	struct ph_subs *S = u->S;

	u->req = NULL;
	if (u->prev)
		u->prev->next = u->next;
	else
		S->subs = u->next;
	if (u->next)
		u->next->prev = u->prev;
	if (!--S->n) {
		/* nobody left: the next one starts from the horizon of its time */
		S->head_known = 0;
		uv_timer_stop(S->beat);
		uv_timer_stop(S->held);
	}
	if (u->busy)
		u->dead = 1;	/* freed when its page comes */
	else
		sub_free(u);
}

static void on_beat(uv_timer_t *t)
{
	struct ph_subs *S = t->data;

	for (struct sub *u = S->subs; u; u = u->next) {
		if (!pending(u) && !u->ended) {
			put(u, ":\n\n", 3);
			wake_stream(u);
		}
		step(u);
	}
	ask_head(S);
}

/* "TX.POS": two whole numbers, digits only. */
static int parse_token(const char *t, struct pos *p)
{
	const char *dot = strchr(t, '.');
	char *end;
	size_t a, b;

	if (!dot)
		return -1;
	a = (size_t)(dot - t);
	b = strlen(dot + 1);
	if (!a || !b || a > 20 || b > 19 || strspn(t, "0123456789") != a || strspn(dot + 1, "0123456789") != b)
		return -1;
	errno = 0;
	p->tx = strtoull(t, &end, 10);
	if (errno || end != dot)
		return -1;
	p->pos = strtoll(dot + 1, &end, 10);
	if (errno || *end)
		return -1;
	return 0;
}

static void bad(struct ph_http_req *r, unsigned status, const char *msg)
{
	ph_http_respond(r, status, "text/plain; charset=utf-8", msg, strlen(msg));
}

/* types: "a,b" into u->type (pointers into u->types' copy). */
static int parse_types(struct sub *u, const char *v)
{
	char *copy, *p;
	int n = 1;

	if (!(u->types = strdup(v)) || !(copy = strdup(v)))
		return -1;
	for (p = copy; *p; p++)
		n += *p == ',';
	/* one allocation: the pointers, then the split copy */
	u->type = malloc(sizeof(char *) * (size_t)n + strlen(v) + 1);
	if (!u->type) {
		free(copy);
		return -1;
	}
	p = (char *)(u->type + n);
	strcpy(p, copy);
	free(copy);
	for (u->ntypes = 0; u->ntypes < n; u->ntypes++) {
		char *c = strchr(p, ',');

		if (c)
			*c = '\0';
		if (!*p)
			return 1;	/* an empty type */
		u->type[u->ntypes] = p;
		p = c ? c + 1 : p + strlen(p);
	}
	return 0;
}

void ph_subs_serve(struct ph_subs *S, struct ph_http_req *r)
{
	const char *cat = ph_http_arg(r, "category"), *stream = ph_http_arg(r, "stream");
	const char *all = ph_http_arg(r, "all"), *types = ph_http_arg(r, "types");
	const char *token = ph_http_header(r, "Last-Event-ID");
	struct sub *u;
	int rc;

	if (!token || !*token)
		token = ph_http_arg(r, "from");
	if ((cat != NULL) + (stream != NULL) + (all != NULL) != 1) {
		bad(r, 400, "one of category=C, stream=S or all=1 is required\n");
		return;
	}
	if ((cat && !*cat) || (stream && !*stream) || (all && strcmp(all, "1") != 0)) {
		bad(r, 400, "category and stream must not be empty; all must be 1\n");
		return;
	}
	if (S->n >= (int)ph_http_share(r, PH_SUB_MAX)) {
		bad(r, 503, "too many subscribers; try again later\n");
		return;
	}
	u = calloc(1, sizeof(*u));
	if (!u) {
		bad(r, 500, "out of memory\n");
		return;
	}
	u->S = S;
	u->kind = cat ? K_CATEGORY : stream ? K_STREAM : K_ALL;
	if (u->kind != K_ALL && !(u->value = strdup(cat ? cat : stream)))
		goto oom;
	if (u->kind == K_STREAM) {
		if (!(u->category = strndup(stream, strcspn(stream, "-"))))
			goto oom;
	}
	if (types) {
		rc = parse_types(u, types);
		if (rc < 0)
			goto oom;
		if (rc > 0) {
			sub_free(u);
			bad(r, 400, "types must be a comma-separated list of event types, none empty\n");
			return;
		}
	}
	u->state = S_WAIT;
	if (token && *token) {
		if (parse_token(token, &u->cur) != 0) {
			sub_free(u);
			bad(r, 400, "a token (from= or Last-Event-ID) is TX.POS, as an event's id: line\n");
			return;
		}
		u->state = S_CATCHUP;
		put(u, ": subscribed\n\n", 14);
	} else if (S->head_known) {
		u->cur = S->head;
		u->state = S_LIVE;
		put(u, ": subscribed\n\n", 14);
	}
	if (u->ended || ph_http_stream(r, "text/event-stream; charset=utf-8", pull, gone, u) != 0) {
		sub_free(u);
		return;		/* the connection is closed */
	}
	u->req = r;
	u->next = S->subs;
	if (S->subs)
		S->subs->prev = u;
	S->subs = u;
	if (!S->n++)
		uv_timer_start(S->beat, on_beat, PH_SUB_HEARTBEAT_MS, PH_SUB_HEARTBEAT_MS);
	ask_head(S);
	step(u);
	return;
oom:
	sub_free(u);
	bad(r, 500, "out of memory\n");
}

void ph_subs_metrics(struct ph_subs *S, struct ph_buf *b)
{
	ph_buf_printf(b, "# HELP projhost_subscribers Clients of GET /subscribe connected now.\n"
		      "# TYPE projhost_subscribers gauge\nprojhost_subscribers %d\n"
		      "# HELP projhost_subscriber_events_total Events sent to subscribers.\n"
		      "# TYPE projhost_subscriber_events_total counter\nprojhost_subscriber_events_total %llu\n"
		      "# HELP projhost_subscriber_overflows_total Subscribers disconnected for falling behind.\n"
		      "# TYPE projhost_subscriber_overflows_total counter\nprojhost_subscriber_overflows_total %llu\n"
		      "# HELP projhost_subscriber_reads_total Shared reads of new events for every live subscriber.\n"
		      "# TYPE projhost_subscriber_reads_total counter\nprojhost_subscriber_reads_total %llu\n",
		      S->n, S->delivered, S->overflows, S->reads);
}

static void on_closed(uv_handle_t *h)
{
	free(h);
}

struct ph_subs *ph_subs_new(uv_loop_t *loop, struct ph_surface *s)
{
	struct ph_subs *S = calloc(1, sizeof(*S));

	if (!S)
		return NULL;
	S->loop = loop;
	S->s = s;
	S->held = calloc(1, sizeof(*S->held));
	S->beat = calloc(1, sizeof(*S->beat));
	if (!S->held || !S->beat) {
		free(S->held);
		free(S->beat);
		free(S);
		return NULL;
	}
	uv_timer_init(loop, S->held);
	uv_timer_init(loop, S->beat);
	S->held->data = S->beat->data = S;
	return S;
}

void ph_subs_shutdown(struct ph_subs *S)
{
	if (!S)
		return;
	for (struct sub *u = S->subs; u; u = u->next) {
		u->ended = 1;
		u->state = S_DONE;
		wake_stream(u);
	}
	uv_timer_stop(S->held);
	uv_timer_stop(S->beat);
}

void ph_subs_free(struct ph_subs *S)
{
	if (!S)
		return;
	uv_close((uv_handle_t *)S->held, on_closed);
	uv_close((uv_handle_t *)S->beat, on_closed);
	free(S);
}
