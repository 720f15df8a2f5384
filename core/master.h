/*
 * master.h - the master process: a libuv loop that LISTENs, keeps the work
 * queue, and feeds worker processes over pipes. It runs no projection code.
 */
#ifndef PH_MASTER_H
#define PH_MASTER_H

/** PH_MAX_WORKERS - the most worker processes `run --workers` may ask for:
 * each holds a PostgreSQL connection (and the master one more), and
 * PostgreSQL's default max_connections is 100. */
#define PH_MAX_WORKERS 64

/** struct ph_master_cfg - what `projhost run` asked for. */
struct ph_master_cfg {
	const char *dsn;		/* libpq connection string */
	const char *bin;		/* this executable, started as `bin __worker` */
	const char *const *paths;	/* projection files and directories */
	int npaths;
	int workers;			/* worker processes (the CLI allows 1..PH_MAX_WORKERS);
					 * clamped to what the process can run */
	int once;			/* catch up, then exit */
	double poll_interval;		/* fallback poll, seconds: a lost NOTIFY only delays */
	const char *http;		/* serve HTTP on this "host:port" (surface.h); NULL: not */
	double stall_after;		/* PROJHOST_STALL_AFTER: seconds, for what HTTP says is stalled */
};

/**
 * ph_master_run() - run until SIGINT/SIGTERM (or, with @cfg->once, until
 * every projection has caught up).
 *
 * Return: process exit code: 0 ok, 1 runtime failure.
 */
int ph_master_run(const struct ph_master_cfg *cfg);

#endif
