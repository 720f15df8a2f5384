/*
 * pg.h - libpq helpers shared by the master, the workers and the Lua binding.
 *
 * Nothing here knows about Lua: bindings live in lua_pg.c.
 */
#ifndef PH_PG_H
#define PH_PG_H

#include <stddef.h>
#include <libpq-fe.h>

/**
 * ph_pg_connect() - open a blocking connection.
 * @dsn: libpq connection string ("" = libpq's own PG* variables)
 * @err: on failure, receives a message naming the server ("host:port: reason");
 *       caller frees it with free().
 *
 * Return: the connection, or NULL with *@err set.
 */
PGconn *ph_pg_connect(const char *dsn, char **err);

/**
 * ph_pg_where() - describe where @conn points, as "host:port" or the socket dir.
 * @conn: a connection, possibly failed
 * @buf: output buffer
 * @len: its size
 *
 * Return: @buf.
 */
const char *ph_pg_where(const PGconn *conn, char *buf, size_t len);

/**
 * ph_pg_errcode() - the SQLSTATE of a failed result, or a connection-level code.
 * @conn: the connection the result came from
 * @res: the result (may be NULL when the query could not be sent)
 *
 * Return: a static or result-owned string such as "23505" or "08006".
 */
const char *ph_pg_errcode(const PGconn *conn, const PGresult *res);

/**
 * ph_pg_errmsg() - the primary error message of @res (or of @conn) without the
 * trailing newline libpq adds, copied into @buf.
 */
const char *ph_pg_errmsg(const PGconn *conn, const PGresult *res, char *buf, size_t len);

#endif
