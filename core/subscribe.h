/*
 * subscribe.h - GET /subscribe: live subscriptions over HTTP as
 * Server-Sent Events (the EventStore client's subscribe_to /
 * read_and_stay_subscribed / fan-out listener).
 *
 *   GET /subscribe?category=C | stream=S | all=1 [&types=a,b] [&from=TOKEN]
 *   (and the Last-Event-ID header, which wins over from=)
 *
 * 200 text/event-stream: first the comment ": subscribed" (from then on
 * nothing committed is missed), then one SSE event per projhost event in
 * the order projections read (transaction_id, global_position), below the
 * xmin horizon (a late-committing transaction is delivered in its place,
 * never skipped):
 *
 *   id: TOKEN            "<transaction_id>.<global_position>", both decimal
 *   event: TYPE          the event's type (left out if it holds CR or LF)
 *   data: {"id","stream","version","position","type","data","metadata","time"}
 *
 * A token resumes after that event: the store is read up to the shared
 * head, then one `event: caught_up` (data {"caught_up":true}, no id), then
 * live. Without a token: live from the current horizon, no marker. Markers
 * carry no `id:` line (an event of type "caught_up" or "overflow" has one).
 *
 * A subscriber whose unsent bytes exceed PH_SUB_BUFFER gets no more events
 * but a final `event: overflow` with data {"last":"TOKEN"} (resume from
 * it), then the stream ends. 400 bad parameters or token; 503 beyond
 * PH_SUB_MAX subscribers.
 *
 * Cost: one read per wake-up of every event after the shared head for all
 * live subscribers (filtered here, each event formatted once); a catching-up
 * subscriber reads its own pages only while its buffer has room, so a slow
 * client slows only itself. The reads run on the HTTP surface's own
 * connection, never a worker's.
 */
#ifndef PH_SUBSCRIBE_H
#define PH_SUBSCRIBE_H

#include <uv.h>

#include "http.h"
#include "metrics.h"

struct ph_surface;

/* Subscribers at once (issue 14: "a thousand idle subscribers"); with
 * /wait's PH_WAIT_MAX_WAITERS they leave connections for /metrics and
 * /health (see PH_HTTP_CONNECTIONS). An idle one costs its connection, a
 * struct and its buffer's high-water mark - no database work: every
 * subscriber is fed from one shared read per batch of new events. */
#define PH_SUB_MAX 1024
/* Unsent bytes a subscriber may have before it overflows. */
#define PH_SUB_BUFFER (256 * 1024)
/* Events per read (the shared live read, a catch-up page). */
#define PH_SUB_PAGE 500
#define PH_SUB_CATCHUP_PAGE 100
/* A comment this often: a client that left is noticed (a suspended
 * connection does not see it), and proxies keep the connection. */
#define PH_SUB_HEARTBEAT_MS 10000

struct ph_subs;

/** ph_subs_new() - subscriptions served with @s's connection. NULL: out of memory. */
struct ph_subs *ph_subs_new(uv_loop_t *loop, struct ph_surface *s);

/** ph_subs_serve() - answer GET /subscribe @r. */
void ph_subs_serve(struct ph_subs *S, struct ph_http_req *r);

/** ph_subs_wake() - new events may be committed: one shared read. */
void ph_subs_wake(struct ph_subs *S);

/** ph_subs_metrics() - append the subscribers' metrics (Prometheus text). */
void ph_subs_metrics(struct ph_subs *S, struct ph_buf *b);

/** ph_subs_shutdown() - end every stream (before the HTTP server stops). */
void ph_subs_shutdown(struct ph_subs *S);

/** ph_subs_free() - after the HTTP server stopped and the queries were flushed. */
void ph_subs_free(struct ph_subs *S);

#endif
