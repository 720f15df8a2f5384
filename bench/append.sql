-- pgbench script for projhost.append throughput (issue 11): one event per
-- transaction, to one of 10,000 streams, as writers append in production.
--   pgbench -n -c 8 -j 2 -T 10 -f bench/append.sql "$DSN"
-- on a database whose schema the host has migrated (`projhost status --db`).
\set s random(1, 10000)
SELECT projhost.append('account-' || :s, NULL, '[{"type":"Deposited","data":{"amount":1}}]');
