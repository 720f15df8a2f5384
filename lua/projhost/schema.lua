-- projhost.schema: the SQL contract (design §2), created and migrated
-- idempotently by every host and CLI command that touches the database.
--
-- schema.migrate(conn [, note]) -> true [, warning, sqlstate] | nil, msg, sqlstate
--
-- Migrations are numbered steps; each is a list of single statements
-- because conn:exec uses the extended protocol, which takes one statement
-- at a time. A step is never edited once released: change the schema by
-- appending a step.
--
-- Errors raised by the SQL functions (clients may rely on these):
--   22023 invalid_parameter_value  a malformed argument; the message names
--                                  the element by its 0-based array index.
--                                  Also a stream name that is empty, longer
--                                  than STREAM_MAX_BYTES or holds a control
--                                  character, and data/metadata nested deeper
--                                  than JSON_MAX_DEPTH (version 2 on)
--   P0001 raise_exception          "wrong expected version for stream 'S':
--                                  expected E, actual A"
--   23505 unique_violation         an event "id" that already exists
local M = {}

-- Fixed key for pg_advisory_xact_lock: two hosts starting at once take
-- turns instead of racing on CREATE ... IF NOT EXISTS (which is not safe
-- under concurrency). 0x70726f6a686f7374 is "projhost" in ASCII.
M.LOCK_KEY = "8102654201364165492"

---------------------------------------------------------------------------
-- Version 1 of the SQL functions, as released (step 1 below). Never edit
-- these: a store at version 1 has exactly these bodies, and step 2
-- replaces them with the current ones further down.

local CHECK_EVENTS_V1 = [[
CREATE OR REPLACE FUNCTION projhost.check_events(p_events jsonb, p_with_stream boolean)
RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
	SELECT 'event at index ' || (ord - 1) || ': ' || problem
	FROM (
		SELECT ord, CASE
			WHEN jsonb_typeof(e) <> 'object' THEN 'is a JSON ' || jsonb_typeof(e) || ', not an object'
			WHEN p_with_stream AND (jsonb_typeof(e->'stream') IS DISTINCT FROM 'string' OR e->>'stream' = '')
				THEN 'needs a non-empty string "stream"'
			WHEN jsonb_typeof(e->'type') IS DISTINCT FROM 'string' OR e->>'type' = ''
				THEN 'needs a non-empty string "type"'
			WHEN jsonb_typeof(e->'data') NOT IN ('object', 'null') THEN '"data" must be an object'
			WHEN jsonb_typeof(e->'metadata') NOT IN ('object', 'null') THEN '"metadata" must be an object'
			WHEN e ? 'id' AND (jsonb_typeof(e->'id') IS DISTINCT FROM 'string' OR NOT (e->>'id') ~*
				'^\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?$')
				THEN '"id" must be a UUID string'
			END AS problem
		FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(e, ord)
	) checked
	WHERE problem IS NOT NULL
	ORDER BY ord
	LIMIT 1
$fn$]]

local APPEND_V1 = [[
CREATE OR REPLACE FUNCTION projhost.append(p_stream text, p_expected_version bigint, p_events jsonb)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
	v_current bigint;
	v_count bigint;
	v_last bigint;
	v_problem text;
BEGIN
	IF p_stream IS NULL OR p_stream = '' THEN
		RAISE EXCEPTION 'projhost.append: stream must be a non-empty string' USING ERRCODE = '22023';
	END IF;
	IF p_expected_version < 0 THEN
		RAISE EXCEPTION 'projhost.append: expected version must be NULL (any), 0 (no stream) or a version, not %',
			p_expected_version USING ERRCODE = '22023';
	END IF;
	IF jsonb_typeof(p_events) IS DISTINCT FROM 'array' OR jsonb_array_length(p_events) = 0 THEN
		RAISE EXCEPTION 'projhost.append: events must be a non-empty JSON array of objects' USING ERRCODE = '22023';
	END IF;
	v_problem := projhost.check_events(p_events, false);
	IF v_problem IS NOT NULL THEN
		RAISE EXCEPTION 'projhost.append: %', v_problem USING ERRCODE = '22023';
	END IF;

	-- The stream row is the per-stream lock, held until commit: version v
	-- can only commit after v-1 did, which partitioned readers rely on.
	INSERT INTO projhost.streams (stream_id, version, last_position)
	VALUES (p_stream, 0, 0) ON CONFLICT (stream_id) DO NOTHING;
	SELECT version INTO v_current FROM projhost.streams WHERE stream_id = p_stream FOR UPDATE;

	IF p_expected_version IS NOT NULL AND p_expected_version <> v_current THEN
		RAISE EXCEPTION 'wrong expected version for stream ''%'': expected %, actual %',
			p_stream, p_expected_version, v_current USING ERRCODE = 'P0001';
	END IF;

	WITH ins AS (
		INSERT INTO projhost.events (event_id, stream_id, stream_version, event_type, data, metadata)
		SELECT coalesce((e->>'id')::uuid, gen_random_uuid()), p_stream, v_current + ord, e->>'type',
			coalesce(nullif(e->'data', 'null'), '{}'), coalesce(nullif(e->'metadata', 'null'), '{}')
		FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(e, ord)
		ORDER BY ord
		RETURNING global_position
	)
	SELECT count(*), max(global_position) INTO v_count, v_last FROM ins;

	UPDATE projhost.streams
	SET version = v_current + v_count, last_position = v_last, updated_at = now()
	WHERE stream_id = p_stream;

	-- NOTIFY payloads are capped at 8000 bytes; "*" (some stream) keeps an
	-- absurdly long stream id from failing the append.
	PERFORM pg_notify('projhost', v_last || ' ' ||
		CASE WHEN octet_length(p_stream) < 7900 THEN p_stream ELSE '*' END);
	RETURN v_current + v_count;
END
$fn$]]

-- append_many is unchanged since: its checks are all in check_events.
local APPEND_MANY = [[
CREATE OR REPLACE FUNCTION projhost.append_many(p_events jsonb)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
	v_count bigint;
	v_last bigint;
	v_problem text;
BEGIN
	IF jsonb_typeof(p_events) IS DISTINCT FROM 'array' THEN
		RAISE EXCEPTION 'projhost.append_many: events must be a JSON array of objects' USING ERRCODE = '22023';
	END IF;
	IF jsonb_array_length(p_events) = 0 THEN
		RETURN 0;
	END IF;
	v_problem := projhost.check_events(p_events, true);
	IF v_problem IS NOT NULL THEN
		RAISE EXCEPTION 'projhost.append_many: %', v_problem USING ERRCODE = '22023';
	END IF;

	-- Create and lock every stream in sorted order, so two bulk loads over
	-- the same streams queue up instead of deadlocking.
	INSERT INTO projhost.streams (stream_id, version, last_position)
	SELECT DISTINCT e->>'stream', 0, 0 FROM jsonb_array_elements(p_events) AS t(e)
	ORDER BY 1
	ON CONFLICT (stream_id) DO NOTHING;
	PERFORM 1 FROM projhost.streams
	WHERE stream_id IN (SELECT e->>'stream' FROM jsonb_array_elements(p_events) AS t(e))
	ORDER BY stream_id
	FOR UPDATE;

	-- One set-based statement: number each stream's events after its
	-- current version, insert in array order, then move the streams on.
	WITH src AS (
		SELECT e, ord, e->>'stream' AS stream FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(e, ord)
	), numbered AS (
		SELECT src.*, s.version + row_number() OVER (PARTITION BY src.stream ORDER BY src.ord) AS version
		FROM src JOIN projhost.streams s ON s.stream_id = src.stream
	), ins AS (
		INSERT INTO projhost.events (event_id, stream_id, stream_version, event_type, data, metadata)
		SELECT coalesce((e->>'id')::uuid, gen_random_uuid()), stream, version, e->>'type',
			coalesce(nullif(e->'data', 'null'), '{}'), coalesce(nullif(e->'metadata', 'null'), '{}')
		FROM numbered
		ORDER BY ord
		RETURNING stream_id, stream_version, global_position
	), per_stream AS (
		SELECT stream_id, count(*) AS n, max(stream_version) AS version, max(global_position) AS last_position
		FROM ins GROUP BY stream_id
	), upd AS (
		UPDATE projhost.streams s
		SET version = p.version, last_position = p.last_position, updated_at = now()
		FROM per_stream p WHERE s.stream_id = p.stream_id
	)
	SELECT sum(n), max(last_position) INTO v_count, v_last FROM per_stream;

	PERFORM pg_notify('projhost', v_last || ' *');
	RETURN v_count;
END
$fn$]]


---------------------------------------------------------------------------
-- The current SQL functions (step 2). A later change to one of them is a
-- new step that replaces it again.

-- The stream name rule, the one place it is written: a name is 1 to
-- STREAM_MAX_BYTES bytes without control characters (C0 U+0001-U+001F,
-- DEL U+007F; text cannot hold U+0000). Names travel in NOTIFY payloads,
-- log lines and the host's job messages, so they must stay short and
-- printable. Returns the problem or NULL; the error path alone pays for
-- finding the character. Every part of the body is immutable (numbers are
-- cast to text: text || integer is only STABLE), so the planner inlines it.
M.STREAM_MAX_BYTES = 1024
local CHECK_STREAM = ([[
CREATE OR REPLACE FUNCTION projhost.check_stream(p_stream text)
RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
	SELECT CASE
		WHEN p_stream IS NULL OR p_stream = '' THEN 'stream must be a non-empty string'
		WHEN octet_length(p_stream) > @MAX@ THEN 'stream name is ' || octet_length(p_stream)::text
			|| ' bytes, longer than the limit of @MAX@ bytes'
		WHEN p_stream ~ '[\x01-\x1f\x7f]' THEN 'stream name contains a control character (U+'
			|| lpad(upper(to_hex(ascii(substring(p_stream FROM '[\x01-\x1f\x7f]')))), 4, '0')
			|| ' at character ' || position(substring(p_stream FROM '[\x01-\x1f\x7f]') IN p_stream)::text
			|| '); control characters U+0000-U+001F and U+007F are not allowed'
		END
$fn$]]):gsub("@MAX@", tostring(M.STREAM_MAX_BYTES))

-- Nesting limit of data and metadata: the host decodes events with
-- lua-cjson, which stops at 1000 levels, and the worker wraps events in
-- a few levels of its own; 512 leaves room. depth({}) = 1.
--
-- Cheap for ordinary events: a jsonb nested d levels takes at least 8
-- bytes per level (container header and the parent's entry), so below
-- 2 KB it cannot be 513 deep and only pg_column_size is paid. Above, the
-- jsonpath walk stops at level JSON_MAX_DEPTH: a container there means a
-- depth of JSON_MAX_DEPTH + 1.
-- STABLE, not IMMUTABLE, because pg_column_size is: the planner inlines
-- a SQL function only when its body is no more volatile than declared,
-- and a call that is not inlined costs more than the whole check.
M.JSON_MAX_DEPTH = 512
local JSON_TOO_DEEP = ([[
CREATE OR REPLACE FUNCTION projhost.json_too_deep(p_value jsonb)
RETURNS boolean LANGUAGE sql STABLE AS $fn$
	SELECT CASE
		WHEN p_value IS NULL OR pg_column_size(p_value) < 2048 THEN false
		ELSE jsonb_path_exists(p_value, 'strict $.**{@MAX@} ? (@.type() == "object" || @.type() == "array")')
		END
$fn$]]):gsub("@MAX@", tostring(M.JSON_MAX_DEPTH))

-- Shared element checks of append and append_many, set-based so a 5,000
-- event chunk costs one scan. Returns the first problem as "event at index
-- I: ..." or NULL. JSON null for data/metadata counts as absent. STABLE
-- like json_too_deep.
--
-- PL/pgSQL rather than SQL (as in version 1): its plan is cached for the
-- session, where a SQL function is parsed, planned and its callees inlined
-- again in every transaction - that cost more than the checks themselves.
local CHECK_EVENTS = ([[
CREATE OR REPLACE FUNCTION projhost.check_events(p_events jsonb, p_with_stream boolean)
RETURNS text LANGUAGE plpgsql STABLE AS $fn$
BEGIN
	RETURN (SELECT 'event at index ' || (ord - 1) || ': ' || problem
	FROM (
		SELECT ord, CASE
			WHEN jsonb_typeof(e) <> 'object' THEN 'is a JSON ' || jsonb_typeof(e) || ', not an object'
			WHEN p_with_stream AND (jsonb_typeof(e->'stream') IS DISTINCT FROM 'string' OR e->>'stream' = '')
				THEN 'needs a non-empty string "stream"'
			WHEN jsonb_typeof(e->'type') IS DISTINCT FROM 'string' OR e->>'type' = ''
				THEN 'needs a non-empty string "type"'
			WHEN jsonb_typeof(e->'data') NOT IN ('object', 'null') THEN '"data" must be an object'
			WHEN jsonb_typeof(e->'metadata') NOT IN ('object', 'null') THEN '"metadata" must be an object'
			WHEN projhost.json_too_deep(e->'data') THEN '"data" is nested deeper than the limit of @MAX@ levels'
			WHEN projhost.json_too_deep(e->'metadata') THEN '"metadata" is nested deeper than the limit of @MAX@ levels'
			WHEN e ? 'id' AND (jsonb_typeof(e->'id') IS DISTINCT FROM 'string' OR NOT (e->>'id') ~*
				'^\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?$')
				THEN '"id" must be a UUID string'
			-- last, so it is written (inlined, planned) once
			WHEN p_with_stream THEN projhost.check_stream(e->>'stream')
			END AS problem
		FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(e, ord)
	) checked
	WHERE problem IS NOT NULL
	ORDER BY ord
	LIMIT 1);
END
$fn$]]):gsub("@MAX@", tostring(M.JSON_MAX_DEPTH))

local APPEND = [[
CREATE OR REPLACE FUNCTION projhost.append(p_stream text, p_expected_version bigint, p_events jsonb)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
	v_current bigint;
	v_count bigint;
	v_last bigint;
	v_problem text;
BEGIN
	v_problem := projhost.check_stream(p_stream);
	IF v_problem IS NOT NULL THEN
		RAISE EXCEPTION 'projhost.append: %', v_problem USING ERRCODE = '22023';
	END IF;
	IF p_expected_version < 0 THEN
		RAISE EXCEPTION 'projhost.append: expected version must be NULL (any), 0 (no stream) or a version, not %',
			p_expected_version USING ERRCODE = '22023';
	END IF;
	IF jsonb_typeof(p_events) IS DISTINCT FROM 'array' OR jsonb_array_length(p_events) = 0 THEN
		RAISE EXCEPTION 'projhost.append: events must be a non-empty JSON array of objects' USING ERRCODE = '22023';
	END IF;
	v_problem := projhost.check_events(p_events, false);
	IF v_problem IS NOT NULL THEN
		RAISE EXCEPTION 'projhost.append: %', v_problem USING ERRCODE = '22023';
	END IF;

	-- The stream row is the per-stream lock, held until commit: version v
	-- can only commit after v-1 did, which partitioned readers rely on.
	INSERT INTO projhost.streams (stream_id, version, last_position)
	VALUES (p_stream, 0, 0) ON CONFLICT (stream_id) DO NOTHING;
	SELECT version INTO v_current FROM projhost.streams WHERE stream_id = p_stream FOR UPDATE;

	IF p_expected_version IS NOT NULL AND p_expected_version <> v_current THEN
		RAISE EXCEPTION 'wrong expected version for stream ''%'': expected %, actual %',
			p_stream, p_expected_version, v_current USING ERRCODE = 'P0001';
	END IF;

	WITH ins AS (
		INSERT INTO projhost.events (event_id, stream_id, stream_version, event_type, data, metadata)
		SELECT coalesce((e->>'id')::uuid, gen_random_uuid()), p_stream, v_current + ord, e->>'type',
			coalesce(nullif(e->'data', 'null'), '{}'), coalesce(nullif(e->'metadata', 'null'), '{}')
		FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(e, ord)
		ORDER BY ord
		RETURNING global_position
	)
	SELECT count(*), max(global_position) INTO v_count, v_last FROM ins;

	UPDATE projhost.streams
	SET version = v_current + v_count, last_position = v_last, updated_at = now()
	WHERE stream_id = p_stream;

	-- NOTIFY payloads are capped at 8000 bytes; "*" (some stream) keeps an
	-- absurdly long stream id from failing the append.
	PERFORM pg_notify('projhost', v_last || ' ' ||
		CASE WHEN octet_length(p_stream) < 7900 THEN p_stream ELSE '*' END);
	RETURN v_current + v_count;
END
$fn$]]

---------------------------------------------------------------------------
-- Bulk loads at scale (issue 11).
--
-- The one home of appending checked events to many streams: append_many
-- (p_events, a JSON array; ord = its 1-based index) and append_staged
-- (p_events NULL: the session's pg_temp.projhost_staged, ord = what the
-- stager gave, a file's line for the CLI) run these same statements. The
-- caller has checked the events. Every stream is created and locked in
-- sorted order before anything is written, so two loads over the same
-- streams queue up instead of deadlocking; each stream's events are
-- numbered after its current version in ord order, inserted in ord order,
-- and its row is updated once. The source is spliced in as one of two
-- constant texts (nothing from the caller); EXECUTE plans with the real
-- size of a staged table, where a cached plan would guess.
local APPEND_ROWS = [[
CREATE OR REPLACE FUNCTION projhost.append_rows(p_events jsonb,
	OUT events bigint, OUT streams bigint, OUT last_position bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
	v_src text := CASE WHEN p_events IS NULL THEN 'pg_temp.projhost_staged'
		ELSE 'jsonb_array_elements($1) WITH ORDINALITY' END || ' AS t(e, ord)';
BEGIN
	EXECUTE format($q$INSERT INTO projhost.streams (stream_id, version, last_position)
		SELECT DISTINCT e->>'stream', 0, 0 FROM %s ORDER BY 1
		ON CONFLICT (stream_id) DO NOTHING$q$, v_src) USING p_events;
	EXECUTE format($q$SELECT count(*) FROM (SELECT 1 FROM projhost.streams
		WHERE stream_id IN (SELECT e->>'stream' FROM %s) ORDER BY stream_id FOR UPDATE) locked$q$, v_src)
		INTO streams USING p_events;
	EXECUTE format($q$WITH numbered AS (
		SELECT t.e, t.ord, s.stream_id AS stream,
			s.version + row_number() OVER (PARTITION BY s.stream_id ORDER BY t.ord) AS version
		FROM %s JOIN projhost.streams s ON s.stream_id = t.e->>'stream'
	), ins AS (
		INSERT INTO projhost.events (event_id, stream_id, stream_version, event_type, data, metadata)
		SELECT coalesce((e->>'id')::uuid, gen_random_uuid()), stream, version, e->>'type',
			coalesce(nullif(e->'data', 'null'), '{}'), coalesce(nullif(e->'metadata', 'null'), '{}')
		FROM numbered
		ORDER BY ord
		RETURNING stream_id, stream_version, global_position
	), per_stream AS (
		SELECT stream_id, count(*) AS n, max(stream_version) AS version, max(global_position) AS last_position
		FROM ins GROUP BY stream_id
	), upd AS (
		UPDATE projhost.streams s
		SET version = p.version, last_position = p.last_position, updated_at = now()
		FROM per_stream p WHERE s.stream_id = p.stream_id
	)
	SELECT coalesce(sum(n), 0)::bigint, max(last_position) FROM per_stream$q$, v_src)
		INTO events, last_position USING p_events;
END
$fn$]]

-- Its checks are all in check_events; the writing is append_rows.
local APPEND_MANY_V2 = [[
CREATE OR REPLACE FUNCTION projhost.append_many(p_events jsonb)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
	v_problem text;
	r record;
BEGIN
	IF jsonb_typeof(p_events) IS DISTINCT FROM 'array' THEN
		RAISE EXCEPTION 'projhost.append_many: events must be a JSON array of objects' USING ERRCODE = '22023';
	END IF;
	IF jsonb_array_length(p_events) = 0 THEN
		RETURN 0;
	END IF;
	v_problem := projhost.check_events(p_events, true);
	IF v_problem IS NOT NULL THEN
		RAISE EXCEPTION 'projhost.append_many: %', v_problem USING ERRCODE = '22023';
	END IF;
	r := projhost.append_rows(p_events);
	PERFORM pg_notify('projhost', r.last_position || ' *');
	RETURN r.events;
END
$fn$]]

-- A load too large for one call, in two steps inside one transaction:
-- stage_events(events, ords) checks a chunk the way append_many does and
-- keeps it in the session's temporary table pg_temp.projhost_staged
-- (dropped at commit), taking no lock; append_staged() then appends all
-- that is staged with append_rows - each stream's row is written once per
-- load, however many chunks - announced at commit like any append (see
-- "One NOTIFY per moment" below).
-- ords: one number per event, increasing over the whole load; they order
-- the events (the CLI passes the file's line numbers). "id"s are cast to
-- uuid here too, so a malformed one fails the chunk that holds it.
local STAGE_EVENTS = [[
CREATE OR REPLACE FUNCTION projhost.stage_events(p_events jsonb, p_ords bigint[])
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
	v_problem text;
	v_count bigint;
BEGIN
	IF jsonb_typeof(p_events) IS DISTINCT FROM 'array' THEN
		RAISE EXCEPTION 'projhost.stage_events: events must be a JSON array of objects' USING ERRCODE = '22023';
	END IF;
	IF p_ords IS NULL OR cardinality(p_ords) <> jsonb_array_length(p_events)
		OR cardinality(p_ords) > 0 AND array_ndims(p_ords) <> 1 OR array_position(p_ords, NULL) IS NOT NULL THEN
		RAISE EXCEPTION 'projhost.stage_events: ords must hold one number per event' USING ERRCODE = '22023';
	END IF;
	v_problem := projhost.check_events(p_events, true);
	IF v_problem IS NOT NULL THEN
		RAISE EXCEPTION 'projhost.stage_events: %', v_problem USING ERRCODE = '22023';
	END IF;
	PERFORM count((e->>'id')::uuid) FROM jsonb_array_elements(p_events) AS t(e);
	IF to_regclass('pg_temp.projhost_staged') IS NULL THEN
		CREATE TEMPORARY TABLE projhost_staged (e jsonb NOT NULL, ord bigint NOT NULL) ON COMMIT DROP;
	END IF;
	EXECUTE $q$INSERT INTO pg_temp.projhost_staged (e, ord)
		SELECT t.e, $2[t.i] FROM jsonb_array_elements($1) WITH ORDINALITY AS t(e, i)$q$
		USING p_events, p_ords;
	GET DIAGNOSTICS v_count = ROW_COUNT;
	RETURN v_count;
END
$fn$]]

local APPEND_STAGED = [[
CREATE OR REPLACE FUNCTION projhost.append_staged()
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
	r record;
BEGIN
	IF to_regclass('pg_temp.projhost_staged') IS NULL THEN
		RETURN 0;
	END IF;
	r := projhost.append_rows(NULL);
	DROP TABLE pg_temp.projhost_staged;
	IF r.events > 0 THEN
		PERFORM pg_notify('projhost', r.last_position || ' *');
	END IF;
	RETURN r.events;
END
$fn$]]

-- After a bulk load: ANALYZE events and streams where they grew since
-- their statistics were taken, so that plans made right after a load (the
-- host's first catch-up) see its size instead of an empty or small table,
-- long before autovacuum gets to it. The rule mirrors autovacuum's own
-- (analyze after 10% + 50 rows changed), counted in pages from the file
-- size, because the row counters of pg_stat_* lag behind (and do not yet
-- hold the caller's own last transaction): a table at least 8 pages large
-- and 10% larger than at its last ANALYZE or VACUUM (relpages) is
-- analyzed. Not inside a load's transaction: ANALYZE holds a lock that
-- conflicts with autovacuum and with CREATE INDEX CONCURRENTLY until
-- commit; the CLI calls it after committing a file, other bulk loaders
-- after theirs. Tables the caller may not analyze (not their owner) are
-- left alone. Returns the tables analyzed.
local ANALYZE_IF_GROWN = [[
CREATE OR REPLACE FUNCTION projhost.analyze_if_grown()
RETURNS TABLE (analyzed text) LANGUAGE plpgsql AS $fn$
DECLARE
	r record;
BEGIN
	FOR r IN
		SELECT format('%I.%I', n.nspname, c.relname) AS name, c.relpages,
			pg_relation_size(c.oid) / current_setting('block_size')::bigint AS pages
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'projhost' AND c.relname IN ('events', 'streams')
			AND pg_has_role(c.relowner, 'USAGE')
		ORDER BY c.relname
	LOOP
		IF r.pages >= 8 AND r.pages > r.relpages * 1.1 THEN
			EXECUTE 'ANALYZE ' || r.name;
			analyzed := r.name;
			RETURN NEXT;
		END IF;
	END LOOP;
END
$fn$]]

---------------------------------------------------------------------------
-- One NOTIFY per moment, not per transaction (issue 11, step 4).
--
-- PostgreSQL serializes notifying commits: PreCommit_Notify takes one
-- cluster-wide lock and holds it until the commit record is flushed, so
-- concurrent appenders that each NOTIFY lose group commit (8 clients:
-- ~60% of the rate without NOTIFY). So at most one committing transaction
-- notifies at a time and the others skip - and a host must still hear of
-- every skipped one once it has committed:
--
-- * Every row written to projhost.streams notes its stream in the
--   transaction-local setting projhost.wake ("<position> <stream>", or
--   "<position> *" once two streams are noted) and queues one deferred
--   constraint trigger per transaction (the WHEN clause runs at update
--   time and is true only for the first note since the trigger last ran).
-- * The trigger runs at commit, before PreCommit_Notify: it takes the
--   shared "in flight" lock L(e) of the current epoch e (and of the newer
--   one if the epoch moved meanwhile), held to the end of its commit, then
--   tries the exclusive lock K: got it -> NOTIFY the noted payload; else
--   another committer is notifying right now -> skip, and count the skip.
-- * A host, after each notification (all of its notifications arrive
--   after the notifier committed, so every skipper that overlapped it
--   already holds L), calls wake_check: it starts a new epoch and tries
--   the retired epochs' L locks; once each was free the skippers of those
--   epochs have all committed, and if the skip count moved since the
--   host's previous epoch it wakes every projection once (their streams
--   were not named). New skippers take the new epoch's lock, so the host
--   never waits for appenders that came after it looked.
-- Nobody waits for anyone at commit: a first design, where the notifier
-- waited for the skippers, reached 60-67% and would have blocked every
-- appender for a whole transaction under SET CONSTRAINTS ... IMMEDIATE.
-- Caveats: a notifier whose commit fails after its trigger ran sends no
-- NOTIFY, and the appends that skipped behind it wait for the fallback
-- poll (PROJHOST_POLL_INTERVAL); SET CONSTRAINTS ALL IMMEDIATE runs the
-- trigger early, so a notifier that keeps K until a late commit delays the
-- others' wake-up until then. Both only delay, never lose, an event.
M.WAKE_LOCK_CLASS = 1885894507 -- "phwk": advisory locks (class, key); keys
M.WAKE_EPOCHS = 64             -- 0..63 are L(e % 64), 64 is K

-- plpgsql, not sql: a SQL function in a trigger's WHEN is parsed and
-- planned again by every statement (measured: a quarter of an append).
local WAKE_NOTE = [[
CREATE OR REPLACE FUNCTION projhost.wake_note(p_stream text, p_position bigint)
RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
	v_noted text := current_setting('projhost.wake', true);
	-- NOTIFY payloads are capped at 8000 bytes: a longer name (an import
	-- by hand; appends allow 1024 bytes) is "some stream", never a commit
	-- that fails
	v_name text := CASE WHEN octet_length(p_stream) < 7900 THEN p_stream ELSE '*' END;
BEGIN
	IF coalesce(v_noted, '') = '' THEN
		PERFORM set_config('projhost.wake', p_position || ' ' || v_name, true);
		RETURN true;
	END IF;
	PERFORM set_config('projhost.wake', greatest(p_position, split_part(v_noted, ' ', 1)::bigint) || ' ' ||
		CASE WHEN substr(v_noted, strpos(v_noted, ' ') + 1) = v_name THEN v_name ELSE '*' END, true);
	RETURN false;
END
$fn$]]

-- SECURITY DEFINER: it runs in the appender's commit, and an application
-- role that may append (INSERT on events, INSERT/UPDATE on streams) must
-- not also need the wake sequences; every name in it is qualified.
local WAKE_AT_COMMIT = ([[
CREATE OR REPLACE FUNCTION projhost.wake_at_commit()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
	v_payload text := current_setting('projhost.wake', true);
	v_epoch bigint;
	v_now bigint;
BEGIN
	IF coalesce(v_payload, '') = '' THEN
		RETURN NULL;
	END IF;
	PERFORM set_config('projhost.wake', '', true);
	SELECT last_value INTO v_epoch FROM projhost.wake_epoch;
	PERFORM pg_advisory_xact_lock_shared(@CLASS@, (v_epoch % @EPOCHS@)::int);
	SELECT last_value INTO v_now FROM projhost.wake_epoch;
	IF v_now <> v_epoch THEN
		PERFORM pg_advisory_xact_lock_shared(@CLASS@, (v_now % @EPOCHS@)::int);
	END IF;
	IF pg_try_advisory_xact_lock(@CLASS@, @EPOCHS@) THEN
		PERFORM pg_notify('projhost', v_payload);
	ELSE
		PERFORM nextval('projhost.wake_skips');
	END IF;
	RETURN NULL;
END
$fn$]]):gsub("@(%u+)@", { CLASS = M.WAKE_LOCK_CLASS, EPOCHS = M.WAKE_EPOCHS })

-- The host's side: p_to NULL starts a new epoch and checks the ones from
-- p_from (the epoch this host started last time; NULL: all) to the one it
-- retired; otherwise checks p_from..p_to again. busy_from: the first epoch
-- whose lock is still held (NULL: all were free); skips_before: the skip
-- count read before the new epoch began; skips: read after the checks.
local WAKE_CHECK = ([[
CREATE OR REPLACE FUNCTION projhost.wake_check(p_from bigint, p_to bigint,
	OUT epoch bigint, OUT skips_before bigint, OUT busy_from bigint, OUT skips bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
	e bigint;
BEGIN
	IF p_to IS NULL THEN
		SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO skips_before FROM projhost.wake_skips;
		epoch := nextval('projhost.wake_epoch');
		p_to := epoch - 1;
	ELSE
		epoch := p_to + 1;
	END IF;
	e := greatest(coalesce(p_from, 1), p_to - @EPOCHS@ + 1, 1);
	WHILE e <= p_to LOOP
		IF NOT pg_try_advisory_xact_lock(@CLASS@, (e % @EPOCHS@)::int) THEN
			busy_from := e;
			EXIT;
		END IF;
		e := e + 1;
	END LOOP;
	SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO skips FROM projhost.wake_skips;
END
$fn$]]):gsub("@(%u+)@", { CLASS = M.WAKE_LOCK_CLASS, EPOCHS = M.WAKE_EPOCHS })

-- The append functions of steps 2 and 3 without their own NOTIFY: the
-- trigger announces them. Derived from those texts, so there is one body.
local function without_notify(body, line)
	local i, j = body:find(line, 1, true)
	assert(i and not body:find(line, j + 1, true), "schema: the NOTIFY line to drop is not there once")
	return body:sub(1, i - 1) .. body:sub(j + 1)
end
local APPEND_V4 = without_notify(APPEND, [[
	-- NOTIFY payloads are capped at 8000 bytes; "*" (some stream) keeps an
	-- absurdly long stream id from failing the append.
	PERFORM pg_notify('projhost', v_last || ' ' ||
		CASE WHEN octet_length(p_stream) < 7900 THEN p_stream ELSE '*' END);
]])
local APPEND_MANY_V4 = without_notify(APPEND_MANY_V2, [[
	PERFORM pg_notify('projhost', r.last_position || ' *');
]])
local APPEND_STAGED_V4 = without_notify(APPEND_STAGED, [[
	IF r.events > 0 THEN
		PERFORM pg_notify('projhost', r.last_position || ' *');
	END IF;
]])

-- Step 1 is the contract of design §2; names are relied on elsewhere.
M.steps = {
	{
		[[CREATE TABLE projhost.events (
			global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
			event_id uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
			stream_id text NOT NULL,
			stream_version bigint NOT NULL CHECK (stream_version >= 1),
			event_type text NOT NULL,
			data jsonb NOT NULL DEFAULT '{}',
			metadata jsonb NOT NULL DEFAULT '{}',
			created_at timestamptz NOT NULL DEFAULT now(),
			transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
			UNIQUE (stream_id, stream_version)
		)]],
		[[CREATE INDEX ON projhost.events (transaction_id, global_position)]],
		[[CREATE TABLE projhost.streams (
			stream_id text PRIMARY KEY,
			version bigint NOT NULL,
			last_position bigint NOT NULL,
			updated_at timestamptz NOT NULL DEFAULT now()
		)]],
		[[CREATE TABLE projhost.checkpoints (
			projection text NOT NULL,
			partition text NOT NULL DEFAULT '',
			version int NOT NULL DEFAULT 1,
			state jsonb,
			last_tx xid8 NOT NULL DEFAULT '0',
			last_pos bigint NOT NULL DEFAULT 0,
			status text NOT NULL DEFAULT 'running'
				CHECK (status IN ('running', 'paused', 'failed', 'stopped')),
			error text,
			script_hash text,
			updated_at timestamptz NOT NULL DEFAULT now(),
			-- failures of the event at retry_pos so far (survives worker
			-- restarts, shared by every worker and instance)
			retry_pos bigint,
			attempts int NOT NULL DEFAULT 0,
			PRIMARY KEY (projection, partition)
		)]],
		-- states are rewritten every batch; compressing a large one costs
		-- more than storing it (TOAST still moves it out of line)
		[[ALTER TABLE projhost.checkpoints ALTER COLUMN state SET STORAGE EXTERNAL]],
		[[CREATE TABLE projhost.parked (
			id bigserial PRIMARY KEY,
			projection text NOT NULL,
			partition text NOT NULL DEFAULT '',
			global_position bigint NOT NULL,
			event_id uuid,
			stream_id text,
			stream_version bigint,
			event_type text,
			error text NOT NULL,
			attempts int NOT NULL DEFAULT 1,
			parked_at timestamptz NOT NULL DEFAULT now(),
			-- `projhost parked retry` sets it; the next batch of the partition
			-- runs the event again before new ones
			retry_requested boolean NOT NULL DEFAULT false
		)]],
		[[CREATE INDEX ON projhost.parked (projection, partition) WHERE retry_requested]],
		CHECK_EVENTS_V1,
		APPEND_V1,
		APPEND_MANY,
	},
	-- issue 10: stream names and nesting are checked (the current bodies)
	{
		CHECK_STREAM,
		JSON_TOO_DEEP,
		CHECK_EVENTS,
		APPEND,
	},
	-- issue 11: bulk loads write each stream's row once; ANALYZE after them
	{
		APPEND_ROWS,
		APPEND_MANY_V2,
		STAGE_EVENTS,
		APPEND_STAGED,
		ANALYZE_IF_GROWN,
	},
	-- issue 11: one NOTIFY at a time, the others announced by the host
	{
		[[CREATE SEQUENCE projhost.wake_epoch]],
		-- epoch 1 is current from the start (a fresh sequence's
		-- last_value is 1 before and after its first nextval)
		[[SELECT nextval('projhost.wake_epoch')]],
		[[CREATE SEQUENCE projhost.wake_skips]],
		WAKE_NOTE,
		WAKE_AT_COMMIT,
		WAKE_CHECK,
		[[CREATE CONSTRAINT TRIGGER wake AFTER INSERT OR UPDATE ON projhost.streams
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
			-- not append's placeholder row (position 0) for a new stream
			WHEN (CASE WHEN NEW.last_position > 0 THEN projhost.wake_note(NEW.stream_id, NEW.last_position) END)
			EXECUTE FUNCTION projhost.wake_at_commit()]],
		APPEND_V4,
		APPEND_MANY_V4,
		APPEND_STAGED_V4,
	},
}

M.latest = #M.steps

-- Indexes that are not steps: built with CREATE INDEX CONCURRENTLY, which
-- does not stop appends (a plain CREATE INDEX holds a SHARE lock on the
-- table for the whole build: minutes on a store of millions of events).
-- CONCURRENTLY cannot run inside the migration's transaction, and a build
-- that fails or is killed leaves an INVALID index, so every migrate()
-- checks them after its steps (one catalog query) and builds what is
-- missing or invalid. Readers work without them, only slower.
M.INDEXES = {
	-- category reads, see projhost.reads
	{ name = "events_category_idx", on = "projhost.events",
		columns = "(split_part(stream_id, '-', 1), transaction_id, global_position)" },
}

-- One builder at a time (another key than LOCK_KEY: a CLI command that
-- migrates must not wait for a build); the others go on without.
M.BUILD_KEY = "8102654201364165493"

-- -> true | nil, msg, sqlstate (a build that failed: the index is left
-- for the next migrate; nothing else depends on it)
local function ensure_indexes(conn, note)
	local function missing()
		-- every index of the schema (a handful): those not listed are ignored
		local rows, msg, code = conn:query([[SELECT c.relname AS name, i.indisvalid AS valid
			FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
			JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = 'projhost']])
		if not rows then return nil, msg, code end
		local have, out = {}, {}
		for _, r in ipairs(rows) do have[r.name] = r.valid == "t" and "valid" or "invalid" end
		for _, ix in ipairs(M.INDEXES) do
			if have[ix.name] ~= "valid" then out[#out + 1] = { ix = ix, invalid = have[ix.name] == "invalid" } end
		end
		return out
	end
	local todo, msg, code = missing()
	if not todo then return nil, msg, code end
	if #todo == 0 then return true end
	local rows
	rows, msg, code = conn:query("SELECT pg_try_advisory_lock($1::bigint) AS got, "
		.. "current_setting('statement_timeout') AS timeout", M.BUILD_KEY)
	if not rows then return nil, msg, code end
	if rows[1].got ~= "t" then return true end -- another session builds them
	local timeout = rows[1].timeout
	-- a build takes as long as it takes; the session's limit would
	-- cancel it (and leave it INVALID) on a large store
	conn:exec("SET statement_timeout = 0")
	local ok = true
	todo, msg, code = missing() -- built by another session meanwhile?
	if not todo then ok = nil end
	for _, t in ipairs(todo or {}) do
		local ix = t.ix
		-- said when it takes a while (a store of 10,000 events is ~2 MB)
		local size = conn:query("SELECT pg_relation_size($1::regclass) AS b", ix.on)
		if note and size and tonumber(size[1].b) >= 64 * 1024 * 1024 then
			note(("building index %s on %s concurrently (appends go on meanwhile)"):format(ix.name, ix.on))
		end
		if t.invalid then
			ok, msg, code = conn:exec("DROP INDEX CONCURRENTLY IF EXISTS projhost." .. ix.name)
		end
		if ok then
			ok, msg, code = conn:exec(("CREATE INDEX CONCURRENTLY IF NOT EXISTS %s ON %s %s")
				:format(ix.name, ix.on, ix.columns))
		end
		if not ok then msg = ("building index %s: %s"):format(ix.name, msg) break end
	end
	conn:exec("SELECT set_config('statement_timeout', $1, false)", timeout)
	conn:exec("SELECT pg_advisory_unlock($1::bigint)", M.BUILD_KEY)
	if not ok then return nil, msg, code end
	return true
end

local function rollback(conn, msg, code)
	conn:exec("ROLLBACK")
	return nil, msg, code
end

-- Apply the steps above the recorded version, all in one transaction, then
-- build the INDEXES that are missing. note(text), if given, hears about a
-- build before it starts. -> true [, warning, sqlstate] | nil, msg, sqlstate
-- (a warning: an index build failed; the store works without it)
function M.migrate(conn, note)
	if conn:in_transaction() then
		error("schema.migrate: the connection is already inside a transaction", 2)
	end
	local ok, msg, code = conn:exec("BEGIN")
	if not ok then return nil, "migrating the schema: " .. msg, code end
	local setup = {
		-- "already exists, skipping" notices would be printed by libpq on
		-- every command; they say nothing useful here.
		{ "SET LOCAL client_min_messages = warning" },
		{ "SELECT pg_advisory_xact_lock($1::bigint)", M.LOCK_KEY },
		{ "CREATE SCHEMA IF NOT EXISTS projhost" },
		{ [[CREATE TABLE IF NOT EXISTS projhost.schema_version (
			version int PRIMARY KEY,
			applied_at timestamptz NOT NULL DEFAULT now()
		)]] },
	}
	for _, s in ipairs(setup) do
		ok, msg, code = conn:exec(unpack(s))
		if not ok then return rollback(conn, "migrating the schema: " .. msg, code) end
	end
	local rows
	rows, msg, code = conn:query("SELECT coalesce(max(version), 0) AS v FROM projhost.schema_version")
	if not rows then return rollback(conn, "migrating the schema: " .. msg, code) end
	local current = tonumber(rows[1].v)
	if current > M.latest then
		return rollback(conn, ("migrating the schema: the database is at schema version %d, "
			.. "newer than this projhost knows (%d); upgrade projhost"):format(current, M.latest), "55000")
	end
	for v = current + 1, M.latest do
		for i, sql in ipairs(M.steps[v]) do
			ok, msg, code = conn:exec(sql)
			if not ok then
				return rollback(conn, ("migrating the schema to version %d (statement %d): %s"):format(v, i, msg), code)
			end
		end
		ok, msg, code = conn:exec("INSERT INTO projhost.schema_version (version) VALUES ($1)", v)
		if not ok then return rollback(conn, "migrating the schema: " .. msg, code) end
	end
	ok, msg, code = conn:exec("COMMIT")
	if not ok then return nil, "migrating the schema: " .. msg, code end
	ok, msg, code = ensure_indexes(conn, note)
	if not ok then return true, msg, code end
	return true
end

return M
