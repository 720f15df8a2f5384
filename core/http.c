/*
 * http.c - see http.h. libmicrohttpd runs with MHD_USE_EPOLL and no
 * thread: its one epoll descriptor (listening socket, connections, its
 * inter-thread channel for resumes) is watched by a uv_poll, and
 * MHD_get_timeout() arms a uv_timer for its connection timeouts; both call
 * MHD_run(), which never blocks.
 */
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <microhttpd.h>

#include "http.h"
#include "log.h"

struct ph_http_req {
	struct ph_http *h;
	struct MHD_Connection *conn;
	char *path;
	int in_access;			/* the handler runs inside the access callback */
	int answered;			/* ph_http_respond() was called */
	int deferred;			/* suspended, waiting for ph_http_respond() */
	struct MHD_Response *resp;	/* a deferred answer to queue once resumed */
	unsigned status;
	struct ph_http_req *prev, *next;	/* deferred ones */
	/* a stream (ph_http_stream) */
	ph_http_pull pull;
	ph_http_gone gone;
	void *sarg;
	int paused;			/* suspended by its reader: nothing to send */
	int ended;			/* ph_http_stop(): the reader ends it */
	struct ph_http_req *sprev, *snext;	/* streams */
};

struct ph_http {
	uv_loop_t *loop;
	struct MHD_Daemon *d;
	uv_poll_t *poll;
	uv_timer_t *timer;
	ph_http_handler cb;
	void *arg;
	struct ph_http_req *deferred;
	struct ph_http_req *streams;
	int running;			/* inside MHD_run(): do not call it again */
	char addr[128];
	unsigned limit;			/* connections served (connection_limit()) */
	uint64_t log_at;		/* the last MHD message logged (ms) */
	unsigned log_dropped;
};

static void drive(struct ph_http *h);

static void on_timer(uv_timer_t *t)
{
	drive(t->data);
}

static void on_poll(uv_poll_t *p, int status, int events)
{
	(void)status;
	(void)events;
	drive(p->data);
}

static unsigned connections(struct ph_http *h)
{
	const union MHD_DaemonInfo *i = h->d ? MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_CURRENT_CONNECTIONS) : NULL;

	return i ? i->num_connections : 0;
}

/* Run MHD, then arm the timer for its next timeout (0: work is waiting,
 * e.g. a resumed connection). */
static void drive(struct ph_http *h)
{
	MHD_UNSIGNED_LONG_LONG ms;

	unsigned before = connections(h);

	if (!h->d || h->running)
		return;
	h->running = 1;
	MHD_run(h->d);
	h->running = 0;
	/* At its connection limit MHD takes the listening socket out of its
	 * epoll set and puts it back only in a later MHD_run(): when the
	 * connections that closed were the last events, nothing else would
	 * call it, and new clients would wait in the kernel's queue for ever. */
	if (connections(h) < before)
		uv_timer_start(h->timer, on_timer, 0, 0);
	else if (MHD_get_timeout(h->d, &ms) == MHD_YES)
		uv_timer_start(h->timer, on_timer, ms > 60000 ? 60000 : (uint64_t)ms, 0);
	else
		uv_timer_stop(h->timer);
}

/* MHD's own messages (a refused connection, a malformed request): a
 * client can cause them at will, so at most one a second is logged. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
	struct ph_http *h = cls;
	char buf[512];
	size_t n;
	uint64_t now = uv_now(h->loop);

	if (h->log_at && now - h->log_at < 1000) {
		h->log_dropped++;
		return;
	}
	vsnprintf(buf, sizeof(buf), fmt, ap);
	n = strlen(buf);
	while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		buf[--n] = '\0';
	if (h->log_dropped)
		ph_log(PH_WARN, "host", "http: %s (and %u more messages in the last second)", buf, h->log_dropped);
	else
		ph_log(PH_WARN, "host", "http: %s", buf);
	h->log_at = now;
	h->log_dropped = 0;
}

static struct MHD_Response *make_response(const char *ctype, const char *body, size_t len)
{
	struct MHD_Response *resp = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);

	if (!resp)
		return NULL;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
	return resp;
}

static enum MHD_Result queue_text(struct MHD_Connection *c, unsigned status, const char *text)
{
	struct MHD_Response *resp = make_response("text/plain; charset=utf-8", text, strlen(text));
	enum MHD_Result ret;

	if (!resp)
		return MHD_NO;
	if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
	ret = MHD_queue_response(c, status, resp);
	MHD_destroy_response(resp);
	return ret;
}

static void unlink_deferred(struct ph_http_req *r)
{
	if (!r->deferred)
		return;
	if (r->prev)
		r->prev->next = r->next;
	else
		r->h->deferred = r->next;
	if (r->next)
		r->next->prev = r->prev;
	r->prev = r->next = NULL;
	r->deferred = 0;
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *c, const char *url, const char *method,
				 const char *version, const char *upload_data, size_t *upload_size, void **con_cls)
{
	struct ph_http *h = cls;
	struct ph_http_req *r = *con_cls;

	(void)version;
	(void)upload_data;
	if (!r) {
		/* the first call: headers are in, the body (if any) is not */
		if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
			return queue_text(c, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD are served\n");
		r = calloc(1, sizeof(*r));
		if (!r || !(r->path = strdup(url))) {
			free(r);
			return MHD_NO;
		}
		r->h = h;
		r->conn = c;
		*con_cls = r;
		return MHD_YES;
	}
	if (*upload_size) {
		/* a GET with a body: dropped (bounded by the connection's memory) */
		*upload_size = 0;
		return MHD_YES;
	}
	if (r->resp) {
		/* resumed with its answer */
		enum MHD_Result ret = MHD_queue_response(c, r->status, r->resp);

		MHD_destroy_response(r->resp);
		r->resp = NULL;
		return ret;
	}
	if (r->answered)
		return MHD_YES;
	r->in_access = 1;
	h->cb(r, h->arg);
	r->in_access = 0;
	if (r->answered)
		return r->status ? MHD_YES : MHD_NO;
	MHD_suspend_connection(c);
	r->deferred = 1;
	r->next = h->deferred;
	if (h->deferred)
		h->deferred->prev = r;
	h->deferred = r;
	return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe)
{
	struct ph_http_req *r = *con_cls;

	(void)cls;
	(void)c;
	(void)toe;
	if (!r)
		return;
	unlink_deferred(r);
	if (r->pull) {
		if (r->sprev)
			r->sprev->snext = r->snext;
		else
			r->h->streams = r->snext;
		if (r->snext)
			r->snext->sprev = r->sprev;
		if (r->gone)
			r->gone(r->sarg);
	}
	if (r->resp)
		MHD_destroy_response(r->resp);
	free(r->path);
	free(r);
	*con_cls = NULL;
}

int ph_http_respond(struct ph_http_req *r, unsigned status, const char *ctype, const char *body, size_t len)
{
	struct MHD_Response *resp = make_response(ctype, body, len);

	r->answered = 1;
	if (r->in_access) {
		/* status 0 tells on_access to close the connection */
		r->status = resp && MHD_queue_response(r->conn, status, resp) == MHD_YES ? status : 0;
		if (resp)
			MHD_destroy_response(resp);
		return r->status ? 0 : -1;
	}
	/* deferred: queue it once MHD has resumed the connection (out of
	 * memory: an empty 500 is still better than a connection held) */
	if (!resp)
		resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
	r->resp = resp;
	r->status = resp ? status : 500;
	unlink_deferred(r);
	MHD_resume_connection(r->conn);
	uv_timer_start(r->h->timer, on_timer, 0, 0);
	return resp ? 0 : -1;
}

/* MHD asks for more of a stream: what the puller has, or a pause (the
 * only way not to be asked again at once: MHD allows suspending here). */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
	struct ph_http_req *r = cls;
	ssize_t n;

	(void)pos;
	if (r->ended)
		return MHD_CONTENT_READER_END_OF_STREAM;
	n = r->pull(r->sarg, buf, max);
	if (n < 0)
		return MHD_CONTENT_READER_END_OF_STREAM;
	if (n == 0 && !r->paused) {
		r->paused = 1;
		MHD_suspend_connection(r->conn);
	}
	return n;
}

int ph_http_stream(struct ph_http_req *r, const char *ctype, ph_http_pull pull, ph_http_gone gone, void *arg)
{
	struct MHD_Response *resp;

	r->answered = 1;
	r->status = 0;
	resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, r, NULL);
	if (!resp)
		return -1;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
	/* proxies (nginx) must not hold the events back */
	MHD_add_response_header(resp, "X-Accel-Buffering", "no");
	if (MHD_queue_response(r->conn, 200, resp) != MHD_YES) {
		MHD_destroy_response(resp);
		return -1;
	}
	MHD_destroy_response(resp);
	r->status = 200;
	r->pull = pull;
	r->gone = gone;
	r->sarg = arg;
	r->snext = r->h->streams;
	if (r->h->streams)
		r->h->streams->sprev = r;
	r->h->streams = r;
	return 0;
}

void ph_http_stream_wake(struct ph_http_req *r)
{
	if (!r->paused)
		return;
	r->paused = 0;
	MHD_resume_connection(r->conn);
	uv_timer_start(r->h->timer, on_timer, 0, 0);
}

const char *ph_http_header(const struct ph_http_req *r, const char *name)
{
	return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

const char *ph_http_path(const struct ph_http_req *r)
{
	return r->path;
}

const char *ph_http_arg(const struct ph_http_req *r, const char *name)
{
	const char *v = NULL;
	size_t n = 0;

	if (MHD_lookup_connection_value_n(r->conn, MHD_GET_ARGUMENT_KIND, name, strlen(name), &v, &n) != MHD_YES)
		return NULL;
	/* a %00 in the value would cut it short as a C string: not the value asked for */
	return v && strlen(v) == n ? v : "";
}

const char *ph_http_address(const struct ph_http *h)
{
	return h->addr;
}

/* "host:port" or "[v6]:port" into getaddrinfo()'s first answer. */
static int resolve(const char *addr, struct addrinfo **ai, char *err, size_t errlen)
{
	char host[256];
	const char *colon = strrchr(addr, ':'), *hs = addr;
	size_t hl;
	struct addrinfo hints;
	int rc;

	if (!colon || !colon[1] || strspn(colon + 1, "0123456789") != strlen(colon + 1) || strlen(colon + 1) > 5 ||
	    atoi(colon + 1) > 65535) {
		snprintf(err, errlen, "'%s' is not host:port", addr);
		return -1;
	}
	hl = (size_t)(colon - addr);
	if (hl >= 2 && addr[0] == '[' && addr[hl - 1] == ']') {
		hs = addr + 1;
		hl -= 2;
	}
	if (hl >= sizeof(host)) {
		snprintf(err, errlen, "host name too long");
		return -1;
	}
	memcpy(host, hs, hl);
	host[hl] = '\0';
	memset(&hints, 0, sizeof(hints));
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
	rc = getaddrinfo(hl ? host : NULL, colon + 1, &hints, ai);
	if (rc != 0) {
		snprintf(err, errlen, "%s: %s", addr, gai_strerror(rc));
		return -1;
	}
	return 0;
}

static void on_closed_free(uv_handle_t *hd)
{
	free(hd);
}

/* PH_HTTP_CONNECTIONS, with the descriptors for them: a fresh Debian
 * session's soft limit is 1,024 (its hard one far more), and a connection
 * accepted past it fails with EMFILE - and so would the master's next
 * pipe or database connection. The soft limit is raised as far as needed
 * (a process may, up to its hard limit); where the hard limit is lower,
 * fewer connections are served, said once. */
static unsigned connection_limit(void)
{
	const rlim_t want = PH_HTTP_CONNECTIONS + PH_HTTP_FD_RESERVE;
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
		return PH_HTTP_CONNECTIONS;
	if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want) {
		struct rlimit up = rl;

		up.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want ? want : rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &up) == 0)
			rl = up;
	}
	if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= want)
		return PH_HTTP_CONNECTIONS;
	unsigned n = rl.rlim_cur > PH_HTTP_FD_RESERVE + 64 ? (unsigned)(rl.rlim_cur - PH_HTTP_FD_RESERVE) : 64;

	ph_log(PH_WARN, "host", "the open files limit is %llu: serving at most %u HTTP connections, not %d "
	       "(raise it with ulimit -n %llu)", (unsigned long long)rl.rlim_cur, n, PH_HTTP_CONNECTIONS,
	       (unsigned long long)want);
	return n;
}

struct ph_http *ph_http_start(uv_loop_t *loop, const char *addr, ph_http_handler cb, void *arg, char *err,
			      size_t errlen)
{
	struct ph_http *h = calloc(1, sizeof(*h));
	struct addrinfo *ai = NULL;
	const union MHD_DaemonInfo *info;
	char host[NI_MAXHOST];
	unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
	int six;

	if (!h) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	if (resolve(addr, &ai, err, errlen) != 0) {
		free(h);
		return NULL;
	}
	six = ai->ai_family == AF_INET6;
	if (six)
		flags |= MHD_USE_IPv6;
	h->loop = loop;
	h->limit = connection_limit();
	h->cb = cb;
	h->arg = arg;
	/* no MHD_OPTION_LISTENING_ADDRESS_REUSE: its SO_REUSEPORT would let a
	 * second host share the port silently (MHD's default SO_REUSEADDR
	 * already allows a quick restart) */
	h->d = MHD_start_daemon(flags, 0, NULL, NULL, on_access, h,
				MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, h,	/* first: it covers the others */
				MHD_OPTION_SOCK_ADDR, ai->ai_addr,
				MHD_OPTION_CONNECTION_LIMIT, h->limit,
				MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)PH_HTTP_CONN_MEMORY,
				MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)PH_HTTP_TIMEOUT_S,
				MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
				MHD_OPTION_END);
	if (!h->d) {
		snprintf(err, errlen, "cannot listen on %s (in use, or not an address of this machine?)", addr);
		freeaddrinfo(ai);
		free(h);
		return NULL;
	}
	if (getnameinfo(ai->ai_addr, ai->ai_addrlen, host, sizeof(host), NULL, 0, NI_NUMERICHOST) != 0)
		snprintf(host, sizeof(host), "?");
	freeaddrinfo(ai);
	info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
	snprintf(h->addr, sizeof(h->addr), six ? "[%s]:%u" : "%s:%u", host, info ? (unsigned)info->port : 0u);
	info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD);
	h->poll = calloc(1, sizeof(*h->poll));
	h->timer = calloc(1, sizeof(*h->timer));
	if (!info || !h->poll || !h->timer || uv_poll_init(loop, h->poll, info->epoll_fd) != 0) {
		snprintf(err, errlen, "cannot watch the HTTP server's descriptor");
		MHD_stop_daemon(h->d);
		free(h->poll);
		free(h->timer);
		free(h);
		return NULL;
	}
	uv_timer_init(loop, h->timer);
	h->poll->data = h->timer->data = h;
	uv_poll_start(h->poll, UV_READABLE, on_poll);
	drive(h);
	return h;
}

unsigned ph_http_share(const struct ph_http_req *r, unsigned n)
{
	unsigned long long v = (unsigned long long)n * r->h->limit / PH_HTTP_CONNECTIONS;

	return v ? (unsigned)v : 1;
}

void ph_http_stop(struct ph_http *h)
{
	if (!h)
		return;
	while (h->deferred)
		ph_http_respond(h->deferred, MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain; charset=utf-8",
				"shutting down\n", 14);
	/* MHD must not be stopped with a connection suspended */
	for (struct ph_http_req *r = h->streams; r; r = r->snext) {
		r->ended = 1;
		ph_http_stream_wake(r);
	}
	/* let MHD take the resumed connections back before it closes them all */
	if (h->d)
		MHD_run(h->d);
	uv_poll_stop(h->poll);
	MHD_stop_daemon(h->d);
	h->d = NULL;
	uv_close((uv_handle_t *)h->poll, on_closed_free);
	uv_close((uv_handle_t *)h->timer, on_closed_free);
	free(h);
}
