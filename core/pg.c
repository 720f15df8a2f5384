/*
 * pg.c - libpq helpers.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pg.h"

const char *ph_pg_where(const PGconn *conn, char *buf, size_t len)
{
	const char *host = conn ? PQhost(conn) : NULL;
	const char *port = conn ? PQport(conn) : NULL;

	if (!host || !*host)
		host = "(default socket)";
	if (host[0] == '/')
		snprintf(buf, len, "socket %s/.s.PGSQL.%s", host, port && *port ? port : "5432");
	else
		snprintf(buf, len, "%s:%s", host, port && *port ? port : "5432");
	return buf;
}

/* libpq's messages end with "\n" and sometimes carry a DETAIL line; a log line
 * must stay one line, so keep the first line only and trim it. */
static void one_line(char *s)
{
	char *nl = strchr(s, '\n');

	if (nl)
		*nl = '\0';
	for (size_t n = strlen(s); n && (s[n - 1] == ' ' || s[n - 1] == '\r'); n--)
		s[n - 1] = '\0';
}

/* Server notices ("relation already exists, skipping", "terminating
 * connection due to administrator command") would go to stderr raw,
 * without time or level; what matters comes back as errors anyway. */
static void quiet_notices(void *arg, const char *msg)
{
	(void)arg;
	(void)msg;
}

PGconn *ph_pg_connect(const char *dsn, char **err)
{
	/* A default connect_timeout, so an unreachable TCP host cannot stall
	 * the master's loop for minutes; the DSN's own value, if any, wins
	 * (expanded after ours). */
	const char *const keys[] = { "connect_timeout", "dbname", NULL };
	const char *const vals[] = { "10", dsn ? dsn : "", NULL };
	PGconn *conn = PQconnectdbParams(keys, vals, 1);
	char msg[1024];

	*err = NULL;
	if (conn && PQstatus(conn) == CONNECTION_OK) {
		PQsetNoticeProcessor(conn, quiet_notices, NULL);
		return conn;
	}
	snprintf(msg, sizeof(msg), "%s", conn ? PQerrorMessage(conn) : "out of memory");
	one_line(msg);
	/* libpq already says "connection to server at ... failed: reason"; only
	 * add the place when it does not. */
	if (strstr(msg, "connection to server") == NULL) {
		char full[1600], where[512];

		snprintf(full, sizeof(full), "cannot connect to %s: %s",
			 ph_pg_where(conn, where, sizeof(where)), msg);
		*err = strdup(full);
	} else {
		*err = strdup(msg);
	}
	PQfinish(conn);
	return NULL;
}

const char *ph_pg_errcode(const PGconn *conn, const PGresult *res)
{
	const char *code = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

	if (code)
		return code;
	if (!conn || PQstatus(conn) != CONNECTION_OK)
		return "08006";	/* connection_failure */
	return "XX000";
}

const char *ph_pg_errmsg(const PGconn *conn, const PGresult *res, char *buf, size_t len)
{
	const char *m = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;

	if (!m || !*m)
		m = res ? PQresultErrorMessage(res) : NULL;
	if (!m || !*m)
		m = conn ? PQerrorMessage(conn) : "no connection";
	snprintf(buf, len, "%s", m);
	one_line(buf);
	return buf;
}
