/*
 * limit.c - what PostgreSQL itself delivers, measured with plain libpq: the
 * ceiling every row of `make bench` is compared with (bench/bench.lua).
 *
 *   limit read DSN                  read every event in (transaction_id,
 *                                   global_position) order, pages of 1000
 *   limit pipeline DSN              read the account-* events in pages of
 *                                   1000 and upsert balances one statement
 *                                   per event in pipeline mode; one
 *                                   transaction per page with a checkpoint
 *   limit setupsert DSN             the same, one set-based upsert per page
 *   limit write DSN RATE SECONDS [PREFIX]
 *                                   append RATE events/s for SECONDS, one
 *                                   SELECT projhost.append(...) per event
 *   limit notify DSN N              NOTIFY round trip (COMMIT -> arrival), N times
 *
 * Each mode prints one line of key=value pairs on stdout; errors go to
 * stderr with exit code 1.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#define PAGE 1000

/* The host's read (lua/projhost/worker/page.lua) without its to_char: every
 * column in text format, below the xmin horizon, keyset pagination. */
#define COLS "global_position, transaction_id, event_id, stream_id, stream_version, " \
	"event_type, data, metadata, created_at"
#define READ_SQL "SELECT " COLS " FROM projhost.events " \
	"WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) " \
	"AND (transaction_id, global_position) > ($1::xid8, $2::bigint) %s" \
	"ORDER BY transaction_id, global_position LIMIT " "1000"
#define CATEGORY_FILTER "AND split_part(stream_id, '-', 1) = 'account' "

#define UPSERT_SQL "INSERT INTO balances (id, amount) VALUES ($1, $2) " \
	"ON CONFLICT (id) DO UPDATE SET amount = $2"
#define SET_UPSERT_SQL "INSERT INTO balances (id, amount) " \
	"SELECT * FROM unnest($1::text[], $2::bigint[]) " \
	"ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount"
#define CHECKPOINT_SQL "UPDATE bench_limit_checkpoint SET last_tx = $1::xid8, last_pos = $2, " \
	"updated_at = now() WHERE id = 1"

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, PGconn *conn, PGresult *res)
{
	fprintf(stderr, "limit: %s: %s", what,
		res ? PQresultErrorMessage(res) : conn ? PQerrorMessage(conn) : "failed\n");
	exit(1);
}

static PGconn *connect_or_die(const char *dsn)
{
	PGconn *conn = PQconnectdb(dsn);

	if (PQstatus(conn) != CONNECTION_OK)
		die("connect", conn, NULL);
	return conn;
}

static void exec_or_die(PGconn *conn, const char *sql)
{
	PGresult *res = PQexec(conn, sql);
	ExecStatusType st = PQresultStatus(res);

	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
		die(sql, conn, res);
	PQclear(res);
}

static void prepare_or_die(PGconn *conn, const char *name, const char *sql)
{
	PGresult *res = PQprepare(conn, name, sql, 0, NULL);

	if (PQresultStatus(res) != PGRES_COMMAND_OK)
		die(name, conn, res);
	PQclear(res);
}

/* ------------------------------------------------------------------ */
/* read */

static int cmd_read(const char *dsn)
{
	PGconn *conn = connect_or_die(dsn);
	char sql[1024], tx[32] = "0", pos[32] = "0";
	const char *params[2] = { tx, pos };
	long long rows = 0, bytes = 0;
	double t0;

	snprintf(sql, sizeof(sql), READ_SQL, "");
	prepare_or_die(conn, "read", sql);
	t0 = now();
	for (;;) {
		PGresult *res = PQexecPrepared(conn, "read", 2, params, NULL, NULL, 0);
		int n, nf;

		if (PQresultStatus(res) != PGRES_TUPLES_OK)
			die("read", conn, res);
		n = PQntuples(res);
		nf = PQnfields(res);
		/* touch every value, as a client that uses them would */
		for (int r = 0; r < n; r++)
			for (int f = 0; f < nf; f++)
				bytes += PQgetlength(res, r, f) + (PQgetvalue(res, r, f)[0] != 0);
		rows += n;
		if (n > 0) {
			snprintf(tx, sizeof(tx), "%s", PQgetvalue(res, n - 1, 1));
			snprintf(pos, sizeof(pos), "%s", PQgetvalue(res, n - 1, 0));
		}
		PQclear(res);
		if (n < PAGE)
			break;
	}
	double dt = now() - t0;

	printf("rows=%lld bytes=%lld seconds=%.3f rows_per_s=%.0f\n", rows, bytes, dt, rows / dt);
	PQfinish(conn);
	return 0;
}

/* ------------------------------------------------------------------ */
/* a small string -> balance map (open addressing over pointers, so an
 * entry stays put while the table grows) */

struct entry {
	char *key;
	long long amount;
	unsigned page_gen;	/* the page that last listed it (setupsert) */
};

static struct entry **map;
static size_t map_cap, map_len;

static uint64_t hash(const char *s)
{
	uint64_t h = 1469598103934665603ULL;

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
}

static void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n, size);

	if (!p) {
		fprintf(stderr, "limit: out of memory\n");
		exit(1);
	}
	return p;
}

static void insert(struct entry *e)
{
	size_t i = hash(e->key) & (map_cap - 1);

	while (map[i])
		i = (i + 1) & (map_cap - 1);
	map[i] = e;
}

static struct entry *lookup(const char *key)
{
	size_t i;
	struct entry *e;

	if ((map_len + 1) * 2 > map_cap) {
		struct entry **old = map;
		size_t old_cap = map_cap;

		map_cap = map_cap ? map_cap * 2 : 1024;
		map = xcalloc(map_cap, sizeof(*map));
		for (size_t j = 0; j < old_cap; j++)
			if (old[j])
				insert(old[j]);
		free(old);
	}
	for (i = hash(key) & (map_cap - 1); map[i]; i = (i + 1) & (map_cap - 1))
		if (strcmp(map[i]->key, key) == 0)
			return map[i];
	e = xcalloc(1, sizeof(*e));
	e->key = strdup(key);
	if (!e->key) {
		fprintf(stderr, "limit: out of memory\n");
		exit(1);
	}
	map[i] = e;
	map_len++;
	return e;
}

/* {"amount": 57} -> 57 (0 when absent) */
static long long amount_of(const char *data)
{
	const char *p = strstr(data, "\"amount\"");

	if (!p)
		return 0;
	p += 8;
	while (*p == ' ' || *p == ':')
		p++;
	return strtoll(p, NULL, 10);
}

/* ------------------------------------------------------------------ */
/* pipeline / setupsert: the balances read model built by plain libpq */

static void get_result_ok(PGconn *conn, const char *what)
{
	PGresult *res = PQgetResult(conn);
	ExecStatusType st = PQresultStatus(res);

	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
		die(what, conn, res);
	PQclear(res);
	/* each pipelined query ends with a NULL result */
	res = PQgetResult(conn);
	if (res)
		die(what, conn, res);
}

static void get_sync(PGconn *conn)
{
	PGresult *res = PQgetResult(conn);

	if (PQresultStatus(res) != PGRES_PIPELINE_SYNC)
		die("pipeline sync", conn, res);
	PQclear(res);
}

/* append s to buf as an element of a text[] literal */
static size_t put_array_elem(char *buf, size_t at, const char *s)
{
	buf[at++] = '"';
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			buf[at++] = '\\';
		buf[at++] = *s;
	}
	buf[at++] = '"';
	return at;
}

static int cmd_write_model(const char *dsn, int set_based)
{
	PGconn *conn = connect_or_die(dsn);
	char sql[1024], tx[32] = "0", pos[32] = "0";
	const char *rparams[2] = { tx, pos };
	long long events = 0;
	unsigned gen = 0;
	/* setupsert: the page's streams and their last amounts */
	char *ids = NULL, *amounts = NULL;
	size_t ids_cap = 0;
	struct entry **slots = calloc(PAGE, sizeof(*slots));
	double t0;

	exec_or_die(conn, "SET client_min_messages = warning");
	exec_or_die(conn, "CREATE TABLE IF NOT EXISTS balances (id text PRIMARY KEY, amount bigint)");
	exec_or_die(conn, "CREATE TABLE IF NOT EXISTS bench_limit_checkpoint (id int PRIMARY KEY, "
		    "last_tx xid8 NOT NULL, last_pos bigint NOT NULL, updated_at timestamptz)");
	exec_or_die(conn, "INSERT INTO bench_limit_checkpoint VALUES (1, '0', 0, now()) "
		    "ON CONFLICT (id) DO UPDATE SET last_tx = '0', last_pos = 0");
	snprintf(sql, sizeof(sql), READ_SQL, CATEGORY_FILTER);
	prepare_or_die(conn, "read", sql);
	if (PQenterPipelineMode(conn) != 1)
		die("enter pipeline mode", conn, NULL);

	t0 = now();
	for (;;) {
		PGresult *page;
		int n;

		/* BEGIN and read the page */
		if (!PQsendQueryParams(conn, "BEGIN", 0, NULL, NULL, NULL, NULL, 0) ||
		    !PQsendQueryPrepared(conn, "read", 2, rparams, NULL, NULL, 0) || !PQpipelineSync(conn))
			die("send read", conn, NULL);
		get_result_ok(conn, "BEGIN");
		page = PQgetResult(conn);
		if (PQresultStatus(page) != PGRES_TUPLES_OK)
			die("read", conn, page);
		if (PQgetResult(conn))
			die("read: more than one result", conn, NULL);
		get_sync(conn);
		n = PQntuples(page);

		/* handlers: the running balance of each stream */
		gen++;
		int nslots = 0;

		for (int r = 0; r < n; r++) {
			const char *type = PQgetvalue(page, r, 5);
			struct entry *e = lookup(PQgetvalue(page, r, 3));
			long long a = amount_of(PQgetvalue(page, r, 6));

			if (strcmp(type, "Deposited") == 0)
				e->amount += a;
			else if (strcmp(type, "Withdrawn") == 0)
				e->amount -= a;
			else
				continue;
			if (!set_based) {
				char amount[32];
				const char *p[2] = { e->key, amount };

				snprintf(amount, sizeof(amount), "%lld", e->amount);
				if (!PQsendQueryParams(conn, UPSERT_SQL, 2, NULL, p, NULL, NULL, 0))
					die("send upsert", conn, NULL);
			} else if (e->page_gen != gen) {
				e->page_gen = gen;
				slots[nslots++] = e;
			}
		}
		if (set_based && nslots > 0) {
			size_t need = 2, at = 0, am = 0;

			for (int i = 0; i < nslots; i++)
				need += 2 * strlen(slots[i]->key) + 3;
			if (need > ids_cap) {
				ids_cap = need * 2;
				ids = realloc(ids, ids_cap);
				amounts = realloc(amounts, (size_t)PAGE * 24 + 2);
				if (!ids || !amounts)
					die("out of memory", NULL, NULL);
			}
			ids[at++] = '{';
			amounts[am++] = '{';
			for (int i = 0; i < nslots; i++) {
				if (i > 0) {
					ids[at++] = ',';
					amounts[am++] = ',';
				}
				at = put_array_elem(ids, at, slots[i]->key);
				am += (size_t)sprintf(amounts + am, "%lld", slots[i]->amount);
			}
			ids[at++] = '}';
			ids[at] = 0;
			amounts[am++] = '}';
			amounts[am] = 0;
			const char *p[2] = { ids, amounts };

			if (!PQsendQueryParams(conn, SET_UPSERT_SQL, 2, NULL, p, NULL, NULL, 0))
				die("send set upsert", conn, NULL);
		}
		if (n > 0) {
			snprintf(tx, sizeof(tx), "%s", PQgetvalue(page, n - 1, 1));
			snprintf(pos, sizeof(pos), "%s", PQgetvalue(page, n - 1, 0));
		}
		events += n;
		PQclear(page);

		/* checkpoint and COMMIT in the same pipeline */
		if (!PQsendQueryParams(conn, CHECKPOINT_SQL, 2, NULL, rparams, NULL, NULL, 0) ||
		    !PQsendQueryParams(conn, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) || !PQpipelineSync(conn))
			die("send commit", conn, NULL);
		for (;;) {
			PGresult *res = PQgetResult(conn);
			ExecStatusType st;

			if (!res)
				continue;	/* the end of one query's results */
			st = PQresultStatus(res);
			if (st == PGRES_PIPELINE_SYNC) {
				PQclear(res);
				break;
			}
			if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
				die("write", conn, res);
			PQclear(res);
		}
		if (n < PAGE)
			break;
	}
	double dt = now() - t0;

	if (PQexitPipelineMode(conn) != 1)
		die("exit pipeline mode", conn, NULL);
	printf("events=%lld streams=%zu seconds=%.3f events_per_s=%.0f\n", events, map_len, dt, events / dt);
	free(ids);
	free(amounts);
	free(slots);
	PQfinish(conn);
	return 0;
}

/* ------------------------------------------------------------------ */
/* write: a steady stream of appends */

static void add_ns(struct timespec *t, long long ns)
{
	t->tv_nsec += ns % 1000000000LL;
	t->tv_sec += ns / 1000000000LL;
	if (t->tv_nsec >= 1000000000L) {
		t->tv_nsec -= 1000000000L;
		t->tv_sec++;
	}
}

static int cmd_write(const char *dsn, double rate, double seconds, const char *prefix)
{
	PGconn *conn = connect_or_die(dsn);
	long long total = (long long)(rate * seconds), behind = 0;
	long long step = (long long)(1e9 / rate);
	struct timespec next;
	char stream[256];
	const char *params[2] = { stream, "[{\"type\": \"Deposited\", \"data\": {\"amount\": 1}}]" };
	double t0, worst = 0;

	prepare_or_die(conn, "append", "SELECT projhost.append($1, NULL, $2::jsonb)");
	clock_gettime(CLOCK_MONOTONIC, &next);
	t0 = now();
	for (long long i = 0; i < total; i++) {
		double late;

		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
			;
		late = now() - ((double)next.tv_sec + (double)next.tv_nsec / 1e9);
		if (late > worst)
			worst = late;
		if (late > 0.001)
			behind++;
		snprintf(stream, sizeof(stream), "%s-%lld", prefix, i % 50 + 1);
		PGresult *res = PQexecPrepared(conn, "append", 2, params, NULL, NULL, 0);

		if (PQresultStatus(res) != PGRES_TUPLES_OK)
			die("append", conn, res);
		PQclear(res);
		add_ns(&next, step);
	}
	double dt = now() - t0;

	printf("events=%lld seconds=%.3f events_per_s=%.1f late_over_1ms=%lld worst_late_ms=%.3f\n",
	       total, dt, total / dt, behind, worst * 1000);
	PQfinish(conn);
	return 0;
}

/* ------------------------------------------------------------------ */
/* notify: the LISTEN/NOTIFY round trip, COMMIT sent -> notification read */

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double pct(const double *sorted, int n, double p)
{
	int i = (int)(p * (n - 1) + 0.5);

	return sorted[i < n ? i : n - 1];
}

static int cmd_notify(const char *dsn, int n)
{
	PGconn *listener = connect_or_die(dsn), *sender = connect_or_die(dsn);
	double *lat = calloc((size_t)n, sizeof(double));
	struct timespec gap = { 0, 2000000 };	/* 2 ms apart, i.e. 500/s */

	if (!lat)
		die("out of memory", NULL, NULL);
	exec_or_die(listener, "LISTEN bench_notify");
	for (int i = 0; i < n; i++) {
		PGnotify *note = NULL;
		PGresult *res;
		double t0;

		exec_or_die(sender, "BEGIN");
		exec_or_die(sender, "NOTIFY bench_notify, 'x'");
		t0 = now();
		if (!PQsendQuery(sender, "COMMIT"))
			die("send COMMIT", sender, NULL);
		while (!note) {
			struct pollfd p = { .fd = PQsocket(listener), .events = POLLIN };

			if (poll(&p, 1, 5000) <= 0)
				die("no notification within 5 s", NULL, NULL);
			if (!PQconsumeInput(listener))
				die("listen", listener, NULL);
			note = PQnotifies(listener);
		}
		lat[i] = now() - t0;
		PQfreemem(note);
		while ((note = PQnotifies(listener)))
			PQfreemem(note);
		while ((res = PQgetResult(sender))) {
			if (PQresultStatus(res) != PGRES_COMMAND_OK)
				die("COMMIT", sender, res);
			PQclear(res);
		}
		nanosleep(&gap, NULL);
	}
	qsort(lat, (size_t)n, sizeof(double), cmp_double);
	printf("n=%d p50_ms=%.3f p99_ms=%.3f max_ms=%.3f\n", n, pct(lat, n, 0.5) * 1000,
	       pct(lat, n, 0.99) * 1000, lat[n - 1] * 1000);
	free(lat);
	PQfinish(listener);
	PQfinish(sender);
	return 0;
}

static int usage(void)
{
	fprintf(stderr, "usage: limit read|pipeline|setupsert DSN\n"
		"       limit write DSN RATE SECONDS [PREFIX]\n"
		"       limit notify DSN N\n");
	return 2;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return usage();
	if (strcmp(argv[1], "read") == 0)
		return cmd_read(argv[2]);
	if (strcmp(argv[1], "pipeline") == 0)
		return cmd_write_model(argv[2], 0);
	if (strcmp(argv[1], "setupsert") == 0)
		return cmd_write_model(argv[2], 1);
	if (strcmp(argv[1], "write") == 0 && argc >= 5 && atof(argv[3]) > 0)
		return cmd_write(argv[2], atof(argv[3]), atof(argv[4]), argc > 5 ? argv[5] : "lat");
	if (strcmp(argv[1], "notify") == 0 && argc == 4 && atoi(argv[3]) > 0)
		return cmd_notify(argv[2], atoi(argv[3]));
	return usage();
}
