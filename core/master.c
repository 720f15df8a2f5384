/*
 * master.c - libuv loop: LISTEN connection, work queue, worker processes,
 * signals and the fallback poll. The messages it exchanges with its
 * workers are described in proto.h.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <uv.h>

#include "beat.h"
#include "frame.h"
#include "log.h"
#include "master.h"
#include "pg.h"
#include "proto.h"
#include "queue.h"
#include "registry.h"
#include "schedule.h"
#include "surface.h"
#include "wakecheck.h"

struct master;

/* Workers one master runs at most, whatever it is asked for. A worker
 * holds one descriptor in the master (its pipe; a second one while it is
 * being replaced, and a few while it is spawned), so the soft
 * RLIMIT_NOFILE less a reserve for the loop, the LISTEN connection and the
 * watchers is the real limit; the fixed cap keeps the worker table and the
 * watchdog's scan small. Each worker also holds a PostgreSQL connection:
 * the cluster's max_connections is usually reached first, and a worker
 * that cannot connect only retries (its jobs answer dberror). */
#define PH_WORKERS_MAX 4096
#define PH_FDS_RESERVED 64

struct worker {
	struct master *m;
	uv_process_t proc;
	uv_pipe_t pipe;
	struct ph_framebuf fb;
	int slot;
	int ready;		/* answered init */
	int quitting;		/* quit sent or to be sent after the job */
	int open_handles;
	struct ph_qentry *jobs[PH_GROUP];	/* in flight */
	int njobs;
	int take_at;		/* where take_job() looks first */
	struct ph_beat *beat;	/* shared heartbeat page (see beat.h) */
	unsigned gen;		/* load generation of its last init/reload */
	int reload_pending;	/* reload once its job is done */
	int killed_pos_valid;	/* the watchdog killed it: */
	int64_t killed_pos;	/* on this event */
	int killed_kind;	/* running this kind of code (beat.h) */
	double killed_budget;
	uint64_t job_start;	/* uv_hrtime() when its job was sent (batch duration) */
};

struct master {
	uv_loop_t *loop;
	const struct ph_master_cfg *cfg;
	int rc;
	int stopping;

	/* LISTEN connection; its poll handle is heap-allocated because a new
	 * one is needed per connection while the old one is still closing */
	PGconn *lconn;
	uv_poll_t *lpoll;
	uv_timer_t reconnect;
	unsigned lfailures;
	struct ph_wakecheck wc;	/* appends that skipped NOTIFY, on lconn */

	uv_timer_t fallback, due, watchdog;
	uv_signal_t sigint, sigterm, sighup;

	struct worker **workers;
	int nworkers, alive;
	unsigned crashes;
	unsigned startup_failures;	/* consecutive workers that died before ready */
	uv_timer_t respawn;

	struct ph_queue q;
	struct ph_registry reg;
	int have_projs;		/* projs came from a worker's init answer */
	unsigned gen;		/* load generation: bumped by each reload request */
	unsigned adopted_gen;	/* generation whose answer projs come from */
	uint64_t signature;	/* of the adopted (name, hash) set */
	uv_fs_event_t *watchers;
	int nwatchers;
	uv_timer_t debounce;
	unsigned long round_work;	/* --once: events applied since the last full round */
	int load_errors;

	struct ph_msg init_msg;
	struct ph_surface *surface;	/* --http; NULL: not served */
};

static void dispatch(struct master *m);
static void spawn_worker(struct master *m, int slot);
static void listen_connect(struct master *m);
static void on_reconnect(uv_timer_t *t);

/* ---- helpers ---- */

static uint64_t now_ms(struct master *m)
{
	uv_update_time(m->loop);
	return uv_now(m->loop);
}

static struct ph_proj *find_proj(struct master *m, const char *name)
{
	return ph_registry_find(&m->reg, name);
}

/* The queue's entry count tells whether a wake-up made a new entry and
 * whether ph_queue_done() freed one: p->nparts follows it without a second
 * copy of the queue's rules. */
static void wake(struct master *m, struct ph_proj *p, const char *part, uint64_t at)
{
	size_t before = m->q.count;

	if (!*part)
		p->settled = 0;
	if (ph_queue_wake(&m->q, p->name, part, at, 0) != 0)
		ph_log(PH_ERROR, p->name, "cannot queue a wake-up: out of memory");
	else if (*part && m->q.count > before)
		p->nparts++;
}

/* ph_queue_done() for an entry of @p (NULL: look it up). */
static void requeue(struct master *m, struct ph_proj *p, struct ph_qentry *e, uint64_t at, int hard)
{
	size_t before = m->q.count;
	int part = *ph_queue_entry_part(e) != '\0';

	if (part && !p)
		p = find_proj(m, ph_queue_entry_proj(e));
	ph_queue_done(&m->q, e, at, hard);
	if (part && p && m->q.count < before && p->nparts > 0)
		p->nparts--;
}

/* Unpartitioned projections have one entry (partition ""); partitioned
 * ones are woken per stream, and "" means "find what is behind". */
static void wake_all(struct master *m)
{
	uint64_t now = now_ms(m);

	for (int i = 0; i < m->reg.n; i++)
		wake(m, &m->reg.projs[i], "", now);
	dispatch(m);
	if (m->surface)
		ph_surface_wake(m->surface);	/* subscribers read too */
}

/* Whether @p's next discovery round reads only the events since its last
 * one (a window, token "i ..." of find_partitions in worker/discovery.lua)
 * instead of walking its streams: a window lists only streams with new events, so a
 * wake-up may start it at once - it is how the streams of appends that
 * skipped their NOTIFY are found. */
static int next_round_is_window(const struct ph_proj *p)
{
	return !p->cursor && p->since && strncmp(p->since, "i ", 2) == 0;
}

static void wake_all_cb(void *arg)
{
	wake_all(arg);
}

/* For GET /wait: whether this host serves @name. */
static int known_cb(void *arg, const char *name)
{
	struct master *m = arg;

	return find_proj(m, name) != NULL;
}

static int stream_matches(const struct ph_proj *p, const char *stream)
{
	return ph_sched_reads(p->kind, p->value, stream);
}

/* ---- worker I/O ---- */

struct wreq {
	uv_write_t req;
	char *buf;
};

static void on_written(uv_write_t *req, int status)
{
	struct wreq *r = (struct wreq *)req;

	(void)status;	/* a dead worker is noticed by its exit callback */
	free(r->buf);
	free(r);
}

static int send_frame(struct worker *w, const char *s, size_t n)
{
	struct wreq *r = calloc(1, sizeof(*r));
	uv_buf_t b;

	if (!r || !(r->buf = ph_frame_encode(s, n))) {
		free(r);
		return -1;
	}
	b = uv_buf_init(r->buf, (unsigned)(n + 4));
	if (uv_write(&r->req, (uv_stream_t *)&w->pipe, &b, 1, on_written) != 0) {
		free(r->buf);
		free(r);
		return -1;
	}
	return 0;
}

static void send_quit(struct worker *w)
{
	w->quitting = 1;
	send_frame(w, ph_proto_verb_name(PH_V_QUIT), strlen(ph_proto_verb_name(PH_V_QUIT)));
}

static void on_handle_closed(uv_handle_t *h)
{
	struct worker *w = h->data;

	if (--w->open_handles == 0) {
		ph_frame_free(&w->fb);
		free(w);
	}
}

static void check_done(struct master *m);

static void request_reload(struct master *m, const char *why);
static void send_reload(struct worker *w);

/* An init or reload answer: which projections loaded, which files failed.
 * The first answer of a load generation becomes the master's list (and is
 * what gets logged); later ones of the same generation are only compared,
 * and a difference (a file changed between two workers' reads) asks for
 * another round. */
static void handle_ready(struct worker *w, char *msg)
{
	struct master *m = w->m;
	int adopt = (!m->have_projs || w->gen != m->adopted_gen) && w->gen == m->gen;
	int initial = !m->have_projs;
	struct ph_registry now = { 0 }, before;
	uint64_t sig;
	int errors;

	/* (an answer to an older request than the last: a newer one is on
	 * its way) */
	errors = ph_registry_read(msg, adopt ? &now : NULL, &sig);
	w->ready = 1;
	m->startup_failures = 0;
	if (w->reload_pending)
		send_reload(w);	/* asked again while it was loading */
	if (!adopt) {
		if (m->have_projs && w->gen == m->adopted_gen && sig != m->signature)
			request_reload(m, "workers read different versions of the files");
		dispatch(m);
		return;
	}
	before = m->reg;
	m->reg = now;
	m->load_errors = errors;
	m->have_projs = 1;
	m->adopted_gen = w->gen;
	m->signature = sig;
	ph_registry_carry(&m->reg, &before, initial);
	ph_registry_free(&before);
	if (m->surface) {
		struct ph_metrics *mx = ph_surface_metrics(m->surface);

		if (!initial && errors)
			mx->reloads_error++;
		else if (!initial)
			mx->reloads_ok++;
		ph_surface_loaded(m->surface, errors);
	}
	if (initial)
		ph_log(PH_INFO, "host", "serving %d projection%s%s", m->reg.n,
		       m->reg.n == 1 ? "" : "s",
		       m->load_errors ? " (some files failed to load, see above)" : "");
	if (m->reg.n == 0 && m->cfg->once) {
		m->rc = 1;
		check_done(m);
		return;
	}
	wake_all(m);
}

static void send_reload(struct worker *w)
{
	w->reload_pending = 0;
	w->ready = 0;		/* no jobs until it answers */
	w->gen = w->m->gen;
	send_frame(w, ph_proto_verb_name(PH_V_RELOAD), strlen(ph_proto_verb_name(PH_V_RELOAD)));
}

/* Reload every worker between batches: idle ones now, busy ones when
 * their batch is done. Never inside a batch. */
static void request_reload(struct master *m, const char *why)
{
	if (m->stopping)
		return;
	m->gen++;
	ph_log(PH_INFO, "host", "%s: reloading projections", why);
	for (int i = 0; i < m->nworkers; i++) {
		struct worker *w = m->workers[i];

		if (!w || w->quitting)
			continue;
		if (w->ready && !w->njobs)
			send_reload(w);
		else
			w->reload_pending = 1;
	}
}

/* Put a finished entry back according to its status. */
static void entry_done(struct master *m, struct ph_qentry *e, const char *status, double delay)
{
	struct ph_next n = ph_sched_done(status, delay, &e->attempts, &e->holds, now_ms(m));
	struct ph_proj *p = find_proj(m, ph_queue_entry_proj(e));

	if (p && !*ph_queue_entry_part(e))
		p->settled = n.settled;
	requeue(m, p, e, n.at, n.hard);
}

/* The entry of @w's job for @part. The worker answers in the job's order,
 * so the search starts after the last entry taken: a job of n partitions
 * costs n comparisons, not n * n / 2. */
static struct ph_qentry *take_job(struct worker *w, const char *part)
{
	for (int k = 0; k < w->njobs; k++) {
		int i = (w->take_at + k) % w->njobs;
		struct ph_qentry *e = w->jobs[i];

		if (e && strcmp(ph_queue_entry_part(e), part) == 0) {
			w->jobs[i] = NULL;
			w->take_at = i + 1;
			return e;
		}
	}
	return NULL;
}

/* "done" and "found" answers: every entry of the job goes back to the queue. */
static void handle_done(struct worker *w, char *msg)
{
	struct master *m = w->m;
	char *f[4];
	int n, found = ph_proto_first(msg) == PH_V_FOUND;
	struct ph_proj *p = NULL;
	unsigned long nfound = 0;
	char find_status[16] = "idle";
	uint64_t now = now_ms(m);
	int relist = 0;
	enum ph_verb v;
	const char *done_proj = NULL;	/* a batch's answer (not a find's) */
	uint64_t done_count = 0;
	struct ph_proj *due_proj = NULL;	/* its "due" line (proto.h) */
	double due_s = 0;

	while ((v = ph_proto_next(&msg, f, 4, &n)) != PH_V_END) {
		switch (v) {
		case PH_V_RELIST:
			relist = 1;
			break;
		case PH_V_DONE:
			p = n >= 1 ? find_proj(m, f[0]) : NULL;
			if (n >= 2)
				m->round_work += strtoul(f[1], NULL, 10);
			done_proj = n >= 1 ? f[0] : NULL;
			done_count = n >= 2 ? strtoull(f[1], NULL, 10) : 0;
			break;
		case PH_V_DUE:
			if (n >= 2) {
				due_proj = find_proj(m, f[0]);
				due_s = atof(f[1]);
			}
			break;
		case PH_V_FIRED:
			if (n >= 2 && m->surface)
				ph_metrics_timers(ph_surface_metrics(m->surface), f[0], strtoull(f[1], NULL, 10));
			break;
		case PH_V_FAILS:
			if (n >= 3 && m->surface)
				ph_metrics_error(ph_surface_metrics(m->surface), f[0], f[1], strtoull(f[2], NULL, 10));
			break;
		case PH_V_FOUND:
			p = n >= 1 ? find_proj(m, f[0]) : NULL;
			if (n >= 3) {
				snprintf(find_status, sizeof(find_status), "%s", f[1]);
				if (p && strcmp(f[1], "more") == 0) {
					free(p->cursor);
					p->cursor = strdup(f[2]);
				} else if (p) {
					free(p->cursor);
					p->cursor = NULL;
					free(p->since);
					p->since = *f[2] ? strdup(f[2]) : NULL;
				}
			}
			break;
		case PH_V_PART:
			if (found && n >= 1) {
				if (p)
					wake(m, p, f[0], now);
				nfound++;
			} else if (!found && n >= 3) {
				struct ph_qentry *e = take_job(w, f[0]);

				if (e)
					entry_done(m, e, f[1], atof(f[2]));
				else if (p)	/* the worker asks for more work, e.g. after a reset */
					wake(m, p, f[0], now);
			}
			break;
		default:
			ph_log(PH_ERROR, "host", "worker %d: unexpected '%s' line in an answer", w->slot,
			       ph_proto_verb_name(v));
		}
	}
	if (found) {
		struct ph_qentry *e = take_job(w, "");

		m->round_work += nfound;
		if (e) {
			int plain;
			struct ph_next nx = ph_sched_after_find(find_status, nfound, p ? p->nparts : 0,
								p && next_round_is_window(p), now, &plain);

			if (plain)
				entry_done(m, e, find_status, 0);
			else
				requeue(m, p, e, nx.at, nx.hard);
		}
	}
	/* anything the worker did not mention runs again */
	for (int i = 0; i < w->njobs; i++)
		if (w->jobs[i])
			entry_done(m, w->jobs[i], "more", 0);
	w->njobs = 0;
	/* its next timer: nothing polls for it, the entry waits until then
	 * (--once does not wait for timers that are not due yet) */
	if (due_proj && !(due_s > 0 && m->cfg->once))
		wake(m, due_proj, "", now + (uint64_t)(due_s > 0 ? (due_s < 1e10 ? due_s : 1e10) * 1000 : 0));
	if (done_proj && m->surface) {
		ph_metrics_batch(ph_surface_metrics(m->surface), done_proj, done_count,
				 (double)(uv_hrtime() - w->job_start) / 1e9);
		ph_surface_batch_done(m->surface, done_proj);
	}
	if (relist)
		request_reload(m, "the projection list changed (a shadow rebuild)");
	if (w->quitting || m->stopping)
		send_quit(w);
	else if (w->reload_pending)
		send_reload(w);
	check_done(m);
	dispatch(m);
}

static void on_worker_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	struct worker *w = s->data;
	char *msg;
	size_t len;
	int rc;

	if (nread > 0 && ph_frame_push(&w->fb, buf->base, (size_t)nread) != 0)
		ph_log(PH_ERROR, "host", "worker %d: out of memory reading its answer", w->slot);
	free(buf->base);
	if (nread < 0) {
		uv_read_stop(s);	/* EOF: its exit callback follows */
		return;
	}
	while ((rc = ph_frame_next(&w->fb, &msg, &len)) == 1) {
		switch (ph_proto_first(msg)) {
		case PH_V_DONE:
		case PH_V_FOUND:
			handle_done(w, msg);
			break;
		case PH_V_READY:
		case PH_V_PROJ:
		case PH_V_ERROR:
			handle_ready(w, msg);
			break;
		default:
			ph_log(PH_ERROR, "host", "worker %d: unknown message of %zu bytes", w->slot, len);
		}
		free(msg);
	}
	if (rc < 0) {
		ph_log(PH_ERROR, "host", "worker %d: corrupt frame; killing it", w->slot);
		uv_process_kill(&w->proc, SIGKILL);
	}
}

static void alloc_buf(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	(void)h;
	buf->base = malloc(suggested);
	buf->len = buf->base ? suggested : 0;
}

static void on_respawn(uv_timer_t *t)
{
	struct master *m = t->data;

	for (int i = 0; i < m->nworkers; i++)
		if (!m->workers[i])
			spawn_worker(m, i);
}

static void on_worker_exit(uv_process_t *proc, int64_t status, int sig)
{
	struct worker *w = proc->data;
	struct master *m = w->m;

	m->workers[w->slot] = NULL;
	m->alive--;
	if (w->njobs) {
		/* Its transaction died with its connection: nothing of the
		 * batch committed. Run it again after a pause that grows
		 * with repeated crashes. When it died inside projection code
		 * (the watchdog's kill, exit() in a C library, a signal), the
		 * next batch charges that event with it instead of running it
		 * again, or the batch would be redone for ever. */
		int64_t pos = 0;
		int kind = 0;

		if (w->killed_pos_valid) {
			pos = w->killed_pos;
			kind = w->killed_kind;
		} else if (!w->beat || ph_beat_read(w->beat, &pos, &kind) < 0) {
			kind = 0;
		}
		if (kind)
			ph_log_at(PH_WARN, ph_queue_entry_proj(w->jobs[0]),
				  &(struct ph_log_fields){ .has = PH_LOG_POSITION, .position = (long long)pos },
				  "worker %d died during a batch (%s %d) running %s code; the batch rolled back and the event is charged with it",
				  w->slot, sig ? "signal" : "exit", sig ? sig : (int)status, ph_beat_kind_name(kind));
		else
			ph_log(PH_WARN, ph_queue_entry_proj(w->jobs[0]),
			       "worker %d died during a batch (%s %d); the batch rolled back and will be redone",
			       w->slot, sig ? "signal" : "exit", sig ? sig : (int)status);
		for (int i = 0; i < w->njobs; i++) {
			struct ph_qentry *e = w->jobs[i];

			if (!e)
				continue;
			if (kind) {
				e->overrun_kind = kind;
				e->overrun_pos = pos;
				e->overrun_budget = w->killed_pos_valid ? w->killed_budget : 0;
				e->overrun_exit = sig ? 0 : (int)status;
				e->overrun_signal = sig;
				e->overrun_backend = w->beat ? ph_beat_backend(w->beat) : 0;
			}
			e->attempts++;
			requeue(m, NULL, e, now_ms(m) + 100u * (e->attempts < 50 ? e->attempts : 50), 1);
		}
		w->njobs = 0;
	} else if (!w->quitting) {
		ph_log(PH_WARN, "host", "worker %d exited unexpectedly (%s %d)", w->slot,
		       sig ? "signal" : "exit", sig ? sig : (int)status);
	}
	if (!w->quitting) {
		m->crashes++;
		if (m->surface)
			ph_surface_metrics(m->surface)->restarts++;
	}
	if (!w->ready && !m->stopping && ++m->startup_failures >= 5) {
		/* A worker that cannot even start (broken install, bad
		 * library path) will not start next time either. */
		ph_log(PH_ERROR, "host", "workers keep dying before they are ready; giving up");
		m->rc = 1;
		m->stopping = 1;
	}
	ph_beat_release(w->beat);
	w->beat = NULL;
	uv_close((uv_handle_t *)&w->proc, on_handle_closed);
	uv_close((uv_handle_t *)&w->pipe, on_handle_closed);
	if (m->stopping) {
		check_done(m);
		return;
	}
	/* respawn; a crash loop backs off so it cannot spin */
	if (!w->quitting && m->crashes > 3)
		uv_timer_start(&m->respawn, on_respawn, 1000, 0);
	else
		spawn_worker(m, w->slot);
}

static void spawn_worker(struct master *m, int slot)
{
	struct worker *w = calloc(1, sizeof(*w));
	uv_process_options_t o;
	uv_stdio_container_t stdio[PH_WORKER_BEAT_FD + 1];
	char *args[3];
	int r, beat_fd = -1;

	if (!w) {
		ph_log(PH_ERROR, "host", "cannot start a worker: out of memory");
		return;
	}
	w->m = m;
	w->slot = slot;
	uv_pipe_init(m->loop, &w->pipe, 0);
	w->pipe.data = w;
	w->proc.data = w;
	memset(&o, 0, sizeof(o));
	memset(stdio, 0, sizeof(stdio));
	stdio[0].flags = UV_IGNORE;
	stdio[1].flags = UV_INHERIT_FD;
	stdio[1].data.fd = 1;
	stdio[2].flags = UV_INHERIT_FD;
	stdio[2].data.fd = 2;
	stdio[PH_WORKER_PIPE_FD].flags = UV_CREATE_PIPE | UV_READABLE_PIPE | UV_WRITABLE_PIPE;
	stdio[PH_WORKER_PIPE_FD].data.stream = (uv_stream_t *)&w->pipe;
	w->beat = ph_beat_create(&beat_fd);
	if (!w->beat)
		ph_log(PH_WARN, "host", "worker %d: no heartbeat page (%s); handler budgets are not enforced",
		       slot, strerror(errno));
	stdio[PH_WORKER_BEAT_FD].flags = w->beat ? UV_INHERIT_FD : UV_IGNORE;
	stdio[PH_WORKER_BEAT_FD].data.fd = beat_fd;
	args[0] = (char *)m->cfg->bin;
	args[1] = "__worker";
	args[2] = NULL;
	o.file = m->cfg->bin;
	o.args = args;
	o.exit_cb = on_worker_exit;
	o.stdio = stdio;
	o.stdio_count = PH_WORKER_BEAT_FD + 1;
	r = uv_spawn(m->loop, &w->proc, &o);
	if (beat_fd >= 0)
		close(beat_fd);	/* the mapping stays */
	if (r != 0) {
		ph_log(PH_ERROR, "host", "cannot start worker %s: %s", m->cfg->bin, uv_strerror(r));
		ph_beat_release(w->beat);
		w->open_handles = 1;
		uv_close((uv_handle_t *)&w->pipe, on_handle_closed);
		uv_timer_start(&m->respawn, on_respawn, 1000, 0);
		return;
	}
	w->open_handles = 2;
	w->gen = m->gen;
	m->workers[slot] = w;
	m->alive++;
	ph_log(PH_DEBUG, "host", "worker %d started (pid %d)", slot, w->proc.pid);
	uv_read_start((uv_stream_t *)&w->pipe, alloc_buf, on_worker_read);
	send_frame(w, m->init_msg.buf, m->init_msg.len);
}

/* ---- dispatch ---- */

static void on_due(uv_timer_t *t)
{
	dispatch(t->data);
}

/* Why a worker died on an event, as the next job tells it (see proto.h). */
static void death_reason(const struct ph_qentry *e, char *buf, size_t cap)
{
	if (e->overrun_budget > 0)
		snprintf(buf, cap, "overran its budget of %gs", e->overrun_budget);
	else if (e->overrun_signal)
		snprintf(buf, cap, "the worker died (signal %d)", e->overrun_signal);
	else if (e->overrun_exit == 255)
		/* lua-cjson's strbuf calls exit(-1) when an allocation fails */
		snprintf(buf, cap, "not enough memory (the worker died with exit 255, as lua-cjson exits when an allocation fails)");
	else
		snprintf(buf, cap, "the worker died (exit %d)", e->overrun_exit);
}

/* The overrun lines of the job in @mb: each death once (every entry of the
 * batch that died carries it; the worker keeps it for this job only). */
static void add_overruns(struct ph_msg *mb, struct worker *w)
{
	int64_t last_pos = 0;
	int last_kind = 0;
	char reason[128];

	for (int i = 0; i < w->njobs; i++) {
		struct ph_qentry *j = w->jobs[i];

		if (!j->overrun_kind)
			continue;
		if (j->overrun_kind != last_kind || j->overrun_pos != last_pos) {
			death_reason(j, reason, sizeof(reason));
			ph_proto_overrun(mb, j->overrun_pos, ph_beat_kind_name(j->overrun_kind), reason,
					 j->overrun_backend);
			last_kind = j->overrun_kind;
			last_pos = j->overrun_pos;
		}
		j->overrun_kind = 0;
	}
}

/* Give @w the next due work: a discovery, an unpartitioned batch, or up to
 * PH_GROUP partitions of one projection. Return: 1 if something was taken. */
static int give_work(struct master *m, struct worker *w, uint64_t now)
{
	struct ph_qentry *e = ph_queue_pop(&m->q, now);
	struct ph_msg mb = { 0 };
	struct ph_proj *p;

	if (!e)
		return 0;
	p = find_proj(m, ph_queue_entry_proj(e));
	if (!p) {
		/* its file was removed or broke on reload */
		requeue(m, NULL, e, UINT64_MAX, 0);
		return 1;
	}
	if (p->partitioned && !*ph_queue_entry_part(e)) {
		if (ph_sched_find_waits(p->nparts, !p->cursor && !next_round_is_window(p), &p->round_wait, now)) {
			requeue(m, p, e, now + 50, 1);
			return 1;
		}
	}
	w->jobs[0] = e;
	w->njobs = 1;
	w->take_at = 0;
	if (p->partitioned && !*ph_queue_entry_part(e)) {
		ph_proto_find(&mb, p->name, p->cursor ? p->cursor : p->since ? p->since : "");
		add_overruns(&mb, w);	/* a death in its caught_up hook */
	} else {
		/* a batch of partitions, bounded by bytes as well as by count:
		 * long stream names must not push the job (or its answer, which
		 * lists the same partitions) past the frame limit */
		size_t bytes = ph_proto_escaped_len(ph_queue_entry_part(e), strlen(ph_queue_entry_part(e)));
		struct ph_qentry *n;

		while (p->partitioned && w->njobs < PH_GROUP && (n = ph_queue_peek(&m->q, now)) &&
		       *ph_queue_entry_part(n) && strcmp(ph_queue_entry_proj(n), p->name) == 0) {
			const char *part = ph_queue_entry_part(n);
			size_t b = ph_proto_escaped_len(part, strlen(part)) + 1;

			if (bytes + b > PH_PROTO_BUDGET)
				break;
			bytes += b;
			w->jobs[w->njobs++] = ph_queue_pop(&m->q, now);
		}
		ph_proto_job(&mb, p->name);
		for (int i = 0; i < w->njobs; i++)
			ph_msg_str(&mb, ph_queue_entry_part(w->jobs[i]));
		add_overruns(&mb, w);
	}
	if (!mb.failed && mb.len > PH_FRAME_MAX) {
		/* only a partition name of megabytes gets here (discovery and
		 * NOTIFY payloads bring shorter ones): it cannot be sent */
		ph_log(PH_ERROR, p->name, "a partition name of %zu bytes is too long to be processed; left behind",
		       strlen(ph_queue_entry_part(e)));
		requeue(m, p, e, UINT64_MAX, 0);
		w->njobs = 0;
		ph_msg_free(&mb);
		return 1;
	}
	w->job_start = uv_hrtime();
	if (mb.failed || send_frame(w, mb.buf, mb.len) != 0) {
		/* its entries come back through the exit callback */
		ph_log(PH_ERROR, "host", "worker %d: cannot send a job (out of memory?); replacing it", w->slot);
		uv_process_kill(&w->proc, SIGKILL);
	}
	ph_msg_free(&mb);
	return 1;
}

static void dispatch(struct master *m)
{
	uint64_t now = now_ms(m), next;

	if (m->stopping)
		return;
	for (int i = 0; i < m->nworkers; i++) {
		struct worker *w = m->workers[i];

		if (!w || !w->ready || w->njobs || w->quitting)
			continue;
		while (!w->njobs && give_work(m, w, now))
			;
		if (!w->njobs)
			break;
	}
	next = ph_queue_next_due(&m->q);
	if (next != UINT64_MAX)
		uv_timer_start(&m->due, on_due, next > now ? next - now : 1, 0);
}

/* --once: done when every projection settled and nothing is queued. */
static void check_done(struct master *m)
{
	if (m->stopping) {
		if (m->alive == 0)
			uv_stop(m->loop);
		return;
	}
	int settled = 1;
	enum ph_once what;

	if (!m->cfg->once || !m->have_projs)
		return;
	for (int i = 0; i < m->reg.n; i++)
		settled = settled && m->reg.projs[i].settled;
	what = ph_sched_once(m->q.count, settled, m->round_work);
	if (what == PH_ONCE_WAIT)
		return;
	if (what == PH_ONCE_AGAIN) {
		m->round_work = 0;
		wake_all(m);
		return;
	}
	ph_log(PH_INFO, "host", "--once: every projection is caught up; exiting");
	if (m->load_errors)
		m->rc = 1;
	m->stopping = 1;
	for (int i = 0; i < m->nworkers; i++)
		if (m->workers[i])
			send_quit(m->workers[i]);
	if (m->alive == 0)
		uv_stop(m->loop);
}

/* ---- LISTEN ---- */

static void on_poll_closed(uv_handle_t *h)
{
	free(h);
}

static void listen_lost(struct master *m, const char *why)
{
	ph_log(PH_ERROR, "host", "lost the LISTEN connection (%s); reconnecting with backoff", why);
	if (m->lpoll) {
		uv_poll_stop(m->lpoll);
		uv_close((uv_handle_t *)m->lpoll, on_poll_closed);
		m->lpoll = NULL;
	}
	ph_wakecheck_attach(&m->wc, NULL);
	PQfinish(m->lconn);
	m->lconn = NULL;
	m->lfailures = 1;
	uv_timer_start(&m->reconnect, on_reconnect, 500, 0);
}

static void on_listen_readable(uv_poll_t *h, int status, int events)
{
	struct master *m = h->data;
	PGnotify *n;
	int all = 0, notified = 0;
	uint64_t now;

	(void)events;
	if (status < 0 || !PQconsumeInput(m->lconn)) {
		char buf[512];

		listen_lost(m, ph_pg_errmsg(m->lconn, NULL, buf, sizeof(buf)));
		return;
	}
	ph_wakecheck_input(&m->wc);
	now = now_ms(m);
	while ((n = PQnotifies(m->lconn))) {
		notified = 1;
		/* payload: "<position> <stream>", stream "*" = many */
		const char *sp = strchr(n->extra, ' ');
		const char *stream = sp ? sp + 1 : "*";

		if (strcmp(stream, "*") == 0)
			all = 1;
		/* "0 *": an operator changed checkpoints (reset, resume, parked
		 * retry): streams that got no events may be behind now, so the
		 * next discovery walks them all */
		if (strcmp(n->extra, "0 *") == 0)
			for (int i = 0; i < m->reg.n; i++) {
				free(m->reg.projs[i].since);
				m->reg.projs[i].since = NULL;
			}
		for (int i = 0; !all && i < m->reg.n; i++) {
			struct ph_proj *p = &m->reg.projs[i];

			if (stream_matches(p, stream))
				wake(m, p, p->partitioned ? stream : "", now);
		}
		PQfreemem(n);
	}
	/* the named streams are woken; those of appends that skipped their
	 * NOTIFY meanwhile are found once they have committed */
	if (notified)
		ph_wakecheck_notified(&m->wc);
	if (all)
		wake_all(m);
	else
		dispatch(m);
	if (notified && !all && m->surface)
		ph_surface_wake(m->surface);
}

static void listen_connect(struct master *m)
{
	char *err = NULL, where[512];
	PGconn *c;

	if (m->stopping)
		return;
	c = ph_pg_connect(m->cfg->dsn, &err);
	if (c) {
		PGresult *r = PQexec(c, "LISTEN projhost");

		if (PQresultStatus(r) != PGRES_COMMAND_OK) {
			char buf[512];

			err = strdup(ph_pg_errmsg(c, r, buf, sizeof(buf)));
			PQfinish(c);
			c = NULL;
		}
		PQclear(r);
	}
	if (!c) {
		/* Log once per outage, not per attempt. */
		unsigned ms = 500u << (m->lfailures < 6 ? m->lfailures : 6);

		if (ms > 30000)
			ms = 30000;
		if (m->lfailures++ == 0)
			ph_log(PH_ERROR, "host", "database unreachable: %s; retrying with backoff", err);
		free(err);
		uv_timer_start(&m->reconnect, on_reconnect, ms, 0);
		return;
	}
	PQsetnonblocking(c, 1);
	if (m->lfailures)
		ph_log(PH_INFO, "host", "database reachable again (%s); listening",
		       ph_pg_where(c, where, sizeof(where)));
	else
		ph_log(PH_INFO, "host", "listening for appends on %s", ph_pg_where(c, where, sizeof(where)));
	m->lfailures = 0;
	m->lconn = c;
	ph_wakecheck_attach(&m->wc, c);
	m->lpoll = calloc(1, sizeof(*m->lpoll));
	uv_poll_init(m->loop, m->lpoll, PQsocket(c));
	m->lpoll->data = m;
	uv_poll_start(m->lpoll, UV_READABLE, on_listen_readable);
	/* Anything appended while we were not listening: catch up. */
	if (m->have_projs)
		wake_all(m);
}

static void on_reconnect(uv_timer_t *t)
{
	listen_connect(t->data);
}

/* ---- signals, timers ---- */

/* A handler that runs past its projection's budget (an endless loop, also a
 * JIT-compiled one that no hook interrupts) gets its worker SIGKILLed: the
 * transaction dies with the connection, and the event is counted as failed. */
static void on_watchdog(uv_timer_t *t)
{
	struct master *m = t->data;

	for (int i = 0; i < m->nworkers; i++) {
		struct worker *w = m->workers[i];
		struct ph_proj *p;
		int64_t pos, ms;
		int kind;

		if (!w || !w->beat || !w->njobs || w->killed_pos_valid || !w->jobs[0])
			continue;
		p = find_proj(m, ph_queue_entry_proj(w->jobs[0]));
		if (!p || p->budget <= 0)
			continue;
		ms = ph_beat_read(w->beat, &pos, &kind);
		if (ms < 0 || ms < (int64_t)(p->budget * 1000))
			continue;
		ph_log_at(PH_ERROR, p->name, &(struct ph_log_fields){ .has = PH_LOG_POSITION, .position = (long long)pos },
			  "%s overran its budget of %gs; killing worker %d", ph_beat_kind_name(kind), p->budget, w->slot);
		w->killed_pos_valid = 1;
		w->killed_pos = pos;
		w->killed_kind = kind ? kind : PH_BEAT_HANDLER;
		w->killed_budget = p->budget;
		uv_process_kill(&w->proc, SIGKILL);
	}
}

static void on_fallback(uv_timer_t *t)
{
	struct master *m = t->data;

	wake_all(m);
	if (m->surface)
		ph_surface_recheck(m->surface);
}

static void on_signal(uv_signal_t *h, int sig)
{
	struct master *m = h->data;

	if (sig == SIGHUP) {
		request_reload(m, "SIGHUP");
		return;
	}
	if (m->stopping) {
		ph_log(PH_WARN, "host", "second signal: killing workers (their batches roll back)");
		for (int i = 0; i < m->nworkers; i++)
			if (m->workers[i])
				uv_process_kill(&m->workers[i]->proc, SIGKILL);
		return;
	}
	ph_log(PH_INFO, "host", "%s: stopping after the batches in flight",
	       sig == SIGINT ? "SIGINT" : "SIGTERM");
	m->stopping = 1;
	for (int i = 0; i < m->nworkers; i++) {
		struct worker *w = m->workers[i];

		if (w && !w->njobs)
			send_quit(w);
		else if (w)
			w->quitting = 1;
	}
	check_done(m);
}

/* ---- watching the projection files ---- */

static void on_debounced(uv_timer_t *t)
{
	request_reload(t->data, "files changed");
}

/* An editor's save is often several events (write a temp file, rename it
 * over, chmod): wait for a quiet moment, then reload once. */
static void on_fs_event(uv_fs_event_t *h, const char *filename, int events, int status)
{
	struct master *m = h->loop->data;
	const char *only = h->data;	/* a watched file: its basename */
	size_t n = filename ? strlen(filename) : 0;

	(void)events;
	if (status < 0)
		return;
	if (filename && only && strcmp(filename, only) != 0)
		return;
	if (filename && !only && (n < 4 || strcmp(filename + n - 4, ".lua") != 0 || filename[0] == '.'))
		return;
	uv_timer_start(&m->debounce, on_debounced, 150, 0);
}

/* Watch each served path: a directory itself, a file through its
 * directory (editors replace files by renaming, which ends a watch on the
 * file's inode). */
static void start_watchers(struct master *m)
{
	m->watchers = calloc((size_t)m->cfg->npaths, sizeof(*m->watchers));
	if (!m->watchers)
		return;
	for (int i = 0; i < m->cfg->npaths; i++) {
		const char *path = m->cfg->paths[i];
		uv_fs_event_t *h = &m->watchers[i];
		uv_fs_t req;
		char dir[4096];
		const char *watch = path;
		int r;

		h->data = NULL;
		r = uv_fs_stat(m->loop, &req, path, NULL);
		if (r == 0 && !(req.statbuf.st_mode & S_IFDIR)) {
			const char *slash = strrchr(path, '/');

			snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - path) : 1, slash ? path : ".");
			watch = dir;
			h->data = (void *)(slash ? slash + 1 : path);
		}
		uv_fs_req_cleanup(&req);
		uv_fs_event_init(m->loop, h);
		r = uv_fs_event_start(h, on_fs_event, watch, 0);
		if (r != 0) {
			ph_log(PH_WARN, "host", "cannot watch %s (%s): reload with SIGHUP", watch, uv_strerror(r));
			uv_close((uv_handle_t *)h, NULL);
			continue;
		}
		m->nwatchers++;
	}
}

static void close_walk(uv_handle_t *h, void *arg)
{
	(void)arg;
	if (!uv_is_closing(h))
		uv_close(h, NULL);
}

static int build_init(struct master *m)
{
	ph_proto_init(&m->init_msg, m->cfg->dsn, m->cfg->paths, m->cfg->npaths);
	return m->init_msg.failed || m->init_msg.len > PH_FRAME_MAX ? -1 : 0;
}

/* @asked workers, or as many as this process can run (see PH_WORKERS_MAX). */
static int clamp_workers(int asked)
{
	struct rlimit rl;
	long fds = PH_WORKERS_MAX * 2L + PH_FDS_RESERVED, max;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)fds)
		fds = (long)rl.rlim_cur;
	max = (fds - PH_FDS_RESERVED) / 2;
	if (max > PH_WORKERS_MAX)
		max = PH_WORKERS_MAX;
	if (max < 1)
		max = 1;
	if (asked < 1)
		return 1;
	if (asked > max) {
		ph_log(PH_WARN, "host", "%d workers asked for; starting %ld, the most this process can run (open files limit %ld, at most %d)",
		       asked, max, fds, PH_WORKERS_MAX);
		return (int)max;
	}
	return asked;
}

int ph_master_run(const struct ph_master_cfg *cfg)
{
	struct master m;
	uv_loop_t loop;

	memset(&m, 0, sizeof(m));
	m.cfg = cfg;
	if (uv_loop_init(&loop) != 0 || ph_queue_init(&m.q) != 0 || build_init(&m) != 0) {
		ph_log(PH_ERROR, "host", "cannot start: out of memory");
		return 1;
	}
	m.loop = &loop;
	signal(SIGPIPE, SIG_IGN);
	m.nworkers = clamp_workers(cfg->workers);
	m.workers = calloc((size_t)m.nworkers, sizeof(*m.workers));
	if (!m.workers) {
		ph_log(PH_ERROR, "host", "cannot start: out of memory");
		uv_loop_close(&loop);
		ph_queue_free(&m.q);
		ph_msg_free(&m.init_msg);
		return 1;
	}

	uv_timer_init(&loop, &m.reconnect);
	uv_timer_init(&loop, &m.fallback);
	uv_timer_init(&loop, &m.due);
	uv_timer_init(&loop, &m.respawn);
	uv_timer_init(&loop, &m.watchdog);
	uv_timer_init(&loop, &m.debounce);
	ph_wakecheck_init(&m.wc, &loop, wake_all_cb, &m);
	m.debounce.data = &m;
	loop.data = &m;
	m.reconnect.data = m.fallback.data = m.due.data = m.respawn.data = m.watchdog.data = &m;
	uv_timer_start(&m.watchdog, on_watchdog, 100, 100);
	uv_signal_init(&loop, &m.sigint);
	uv_signal_init(&loop, &m.sigterm);
	uv_signal_init(&loop, &m.sighup);
	m.sigint.data = m.sigterm.data = m.sighup.data = &m;
	uv_signal_start(&m.sigint, on_signal, SIGINT);
	uv_signal_start(&m.sigterm, on_signal, SIGTERM);
	uv_signal_start(&m.sighup, on_signal, SIGHUP);

	if (cfg->http && *cfg->http && !(m.surface = ph_surface_start(&loop, cfg->http, cfg->dsn, cfg->stall_after, known_cb, &m))) {
		m.rc = 1;
		m.stopping = 1;
	}
	for (int i = 0; !m.stopping && i < m.nworkers; i++)
		spawn_worker(&m, i);
	if (m.stopping) {
		/* nothing was started: fall through to the cleanup */
	} else if (!cfg->once) {
		uint64_t ms = (uint64_t)((cfg->poll_interval > 0 ? cfg->poll_interval : 5.0) * 1000);

		listen_connect(&m);
		uv_timer_start(&m.fallback, on_fallback, ms, ms);
		start_watchers(&m);
	}
	if (!m.stopping)
		uv_run(&loop, UV_RUN_DEFAULT);

	/* stopped: close what is left and let the callbacks run */
	ph_surface_stop(m.surface);
	m.surface = NULL;
	if (m.lpoll)
		uv_close((uv_handle_t *)m.lpoll, on_poll_closed);
	if (m.lconn)
		PQfinish(m.lconn);
	m.lconn = NULL;
	uv_walk(&loop, close_walk, NULL);
	uv_run(&loop, UV_RUN_DEFAULT);
	uv_loop_close(&loop);
	ph_queue_free(&m.q);
	ph_registry_free(&m.reg);
	free(m.workers);
	free(m.watchers);
	ph_msg_free(&m.init_msg);
	return m.rc;
}
