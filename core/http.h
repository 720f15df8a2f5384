/*
 * http.h - an HTTP/1.1 server on a libuv loop: libmicrohttpd with no thread
 * of its own, its epoll descriptor watched by a uv_poll and its timeouts by
 * a uv_timer, so every request is handled on the loop that calls
 * ph_http_start(). No HTTP is parsed here: libmicrohttpd does it.
 *
 * A slow or hostile client never blocks the loop: reads and writes are
 * nonblocking, and what one may hold is bounded - PH_HTTP_CONNECTIONS
 * connections (more are closed at once; fewer under a low open-files limit), PH_HTTP_CONN_MEMORY bytes of
 * request per connection (a larger request line or header is answered 431
 * or 414), PH_HTTP_TIMEOUT_S seconds without progress (the connection is
 * closed). Only GET and HEAD are served (405 for anything else, without
 * reading a body).
 *
 * A handler answers with ph_http_respond(), either before it returns or
 * later (a deferred request: its connection is suspended meanwhile and
 * costs the loop nothing; its timeout does not run while it waits).
 */
#ifndef PH_HTTP_H
#define PH_HTTP_H

#include <stddef.h>
#include <sys/types.h>
#include <uv.h>

/* Connections at once: room for PH_SUB_MAX (1,024) subscribers and
 * PH_WAIT_MAX_WAITERS (256) waiters, which hold theirs, and 128 more for
 * /metrics, /health and the page (surface.c checks the sum). Each costs a
 * descriptor: ph_http_start() raises the soft RLIMIT_NOFILE to fit them
 * and PH_HTTP_FD_RESERVE more (the master's pipes, database connections,
 * files), or serves fewer connections when the hard limit is lower. */
#define PH_HTTP_CONNECTIONS 1408
#define PH_HTTP_FD_RESERVE 256
#define PH_HTTP_CONN_MEMORY (32 * 1024)
#define PH_HTTP_TIMEOUT_S 10

struct ph_http;
struct ph_http_req;

/** ph_http_handler - called once per request (GET or HEAD) on the loop. */
typedef void (*ph_http_handler)(struct ph_http_req *req, void *arg);

/**
 * ph_http_start() - listen on @addr ("host:port", "[v6addr]:port"; port 0
 * picks a free one) and serve requests with @cb(@arg).
 * @err: receives why not (NUL-terminated, at most @errlen bytes)
 *
 * Return: the server, or NULL.
 */
struct ph_http *ph_http_start(uv_loop_t *loop, const char *addr, ph_http_handler cb, void *arg, char *err,
			      size_t errlen);

/** ph_http_address() - where it listens, "host:port" with the real port. */
const char *ph_http_address(const struct ph_http *h);

/**
 * ph_http_stop() - close every connection and the listening socket; a
 * request still deferred is answered 503 first. Frees @h (NULL is fine).
 * The loop must run afterwards for the handles to close.
 */
void ph_http_stop(struct ph_http *h);

/**
 * ph_http_share() - @n connections of PH_HTTP_CONNECTIONS, scaled to the
 * ones the server of @r serves (fewer under a low open-files limit): a
 * route's cap on connections it holds (subscribers, waiters). At least 1.
 */
unsigned ph_http_share(const struct ph_http_req *r, unsigned n);

/** ph_http_path() - the request's path, without the query string. */
const char *ph_http_path(const struct ph_http_req *r);

/**
 * ph_http_arg() - the value of query argument @name (percent-decoded), or
 * NULL; "" for a value holding a NUL byte, which a C string cannot carry.
 */
const char *ph_http_arg(const struct ph_http_req *r, const char *name);

/**
 * ph_http_respond() - answer @r with @status and a copy of @body (@len
 * bytes) of type @ctype. @r is not valid afterwards. Return: 0, or -1 out
 * of memory (the connection is then closed).
 */
int ph_http_respond(struct ph_http_req *r, unsigned status, const char *ctype, const char *body, size_t len);

/**
 * ph_http_pull - a stream's next bytes: copy at most @max into @buf and
 * return how many; 0: none yet (the connection is suspended, costing the
 * loop nothing, until ph_http_stream_wake()); -1: the stream ends.
 */
typedef ssize_t (*ph_http_pull)(void *arg, char *buf, size_t max);

/** ph_http_gone - the stream's connection ended (client left, or after its end). */
typedef void (*ph_http_gone)(void *arg);

/**
 * ph_http_stream() - answer @r 200 with a body of unknown length (chunked
 * on HTTP/1.1; closed at the end on HTTP/1.0) of type @ctype, pulled with
 * @pull(@arg) whenever the client can take more. Only from the handler
 * itself (not deferred). @gone(@arg) is called exactly once, when the
 * connection ends; @r stays valid until then. A client that stops reading
 * is closed after PH_HTTP_TIMEOUT_S without progress, as any other.
 * Return: 0, or -1 (out of memory: the connection is closed, @gone is not called).
 */
int ph_http_stream(struct ph_http_req *r, const char *ctype, ph_http_pull pull, ph_http_gone gone, void *arg);

/** ph_http_stream_wake() - there are bytes to pull now (or its end). */
void ph_http_stream_wake(struct ph_http_req *r);

/** ph_http_header() - the value of request header @name, or NULL. */
const char *ph_http_header(const struct ph_http_req *r, const char *name);

#endif
