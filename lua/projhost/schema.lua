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
--   (Since step 10 the writers note and the trigger fires for each row;
--   see "Step 10:" below.)
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
-- Each statement of wake_note and wake_at_commit is an expression: a
-- PERFORM or a SELECT INTO is an executor run through SPI, an assignment or
-- a RETURN of an expression is not (plpgsql's simple expressions). With
-- them, at 8 appenders, the commit trigger was ~9% of the server's time
-- (perf), three fifths of it in those runs.
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
		RETURN set_config('projhost.wake', p_position || ' ' || v_name, true) IS NOT NULL;
	END IF;
	RETURN set_config('projhost.wake', greatest(p_position, split_part(v_noted, ' ', 1)::bigint) || ' ' ||
		CASE WHEN substr(v_noted, strpos(v_noted, ' ') + 1) = v_name THEN v_name ELSE '*' END, true) IS NULL;
END
$fn$]]

-- The commit's half both versions of wake_at_commit share: the epoch's
-- "in flight" lock, then notify or skip (v_state: the payload).
-- (pg_sequence_last_value is NULL before a sequence's first nextval, when
-- last_value reads 1: coalesced to it.)
local WAKE_LOCKS_AND_NOTIFY = [[
	v_epoch := coalesce(pg_sequence_last_value('projhost.wake_epoch'), 1);
	v_void := pg_advisory_xact_lock_shared(@CLASS@, (v_epoch % @EPOCHS@)::int) IS NULL;
	v_now := coalesce(pg_sequence_last_value('projhost.wake_epoch'), 1);
	IF v_now <> v_epoch THEN
		v_void := pg_advisory_xact_lock_shared(@CLASS@, (v_now % @EPOCHS@)::int) IS NULL;
	END IF;
	IF pg_try_advisory_xact_lock(@CLASS@, @EPOCHS@) THEN
		v_void := pg_notify('projhost', v_state) IS NULL;
	ELSE
		v_now := nextval('projhost.wake_skips');
	END IF;
	RETURN NULL;
END
$fn$]]

-- Steps 4 and 9's. SECURITY DEFINER: it runs in the appender's commit, and an
-- application role that may append (INSERT on events, INSERT/UPDATE on
-- streams) must not also need the wake sequences; every name in it is
-- qualified. (Step 10's runs as the appender.)
local WAKE_AT_COMMIT = ([[
CREATE OR REPLACE FUNCTION projhost.wake_at_commit()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
	v_state text := current_setting('projhost.wake', true);
	v_epoch bigint;
	v_now bigint;
	v_void boolean;
BEGIN
	IF coalesce(v_state, '') = '' THEN
		RETURN NULL;
	END IF;
	v_void := set_config('projhost.wake', '', true) IS NULL;
]] .. WAKE_LOCKS_AND_NOTIFY):gsub("@(%u+)@", { CLASS = M.WAKE_LOCK_CLASS, EPOCHS = M.WAKE_EPOCHS })

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
-- (Each edit of a body must find its place exactly once.)
local function replace_once(body, old, new)
	local i, j = body:find(old, 1, true)
	assert(i and not body:find(old, j + 1, true), "schema: the text to replace is not there once")
	return body:sub(1, i - 1) .. new .. body:sub(j + 1)
end
local function without_notify(body, line)
	return replace_once(body, line, "")
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

-- Step 10: the writers note, the triggers only fire. With wake_note in
-- the trigger's WHEN, every statement that wrote a streams row paid for
-- reading the WHEN's node tree back from its text and for a plpgsql call,
-- and the commit for a SECURITY DEFINER call that saves and restores
-- search_path: the trigger cost 26% on top of an append of a new stream,
-- and 8 appenders reached ~79% of the rate without it. Now:
-- * projhost's own writers (append, append_rows) note what they wrote in
--   projhost.wake themselves, a few statements of their body
--   (wake_note_plpgsql): append before it writes its row, append_rows
--   after its statement that does.
-- * Trigger wake fires for every UPDATE that sets last_position (a column
--   list costs nothing per statement, a WHEN does), wake_insert for every
--   INSERT of a row with a position (append's placeholder for a new
--   stream has none): both at commit, once per row.
-- * The first firing with a note pending announces it (as before: notify
--   or skip; with "*" for the stream if the firing's row is not the
--   note's: a row of other SQL queued first); the note then becomes
--   " <stream>" (or " *"): announced, and the firings of the rows it
--   covered return at once. A row no note
--   covers - written by other SQL, an import by hand - is announced by its
--   own firing: "<position> <stream>" if nothing was announced before it,
--   else "<position> *", which covers every later row; so other SQL adds
--   at most two notifications to a transaction.
-- * wake_at_commit runs as the appender (no SECURITY DEFINER): the two
--   wake sequences are usable by PUBLIC instead. What that lets a role
--   with USAGE on the schema do - start epochs, count skips: make hosts
--   wake every projection once - it could already do with NOTIFY.
-- Measured with valgrind (callgrind) on a single-user postgres, 500
-- appends of one event to new streams, instructions per append: with the
-- trigger 852,000 and without 675,000 before (79%); 777,000 and 694,000
-- now (89%; the note is the 19,000 the appends without triggers gained).
-- The note, as statements of a plpgsql body that declares v_noted text:
-- two simple expressions in the common case (nothing noted yet), where
-- one expression with the whole rule cost 33,000 instructions per append.
local function wake_note_plpgsql(position, name)
	return ([[
	IF coalesce(split_part(current_setting('projhost.wake', true), ' ', 1), '') = '' THEN
		v_noted := set_config('projhost.wake', @P@ || ' ' || @S@, true);
	ELSE
		v_noted := current_setting('projhost.wake', true);
		v_noted := set_config('projhost.wake', greatest(@P@, split_part(v_noted, ' ', 1)::bigint) || ' ' ||
			CASE WHEN substr(v_noted, strpos(v_noted, ' ') + 1) = @S@ THEN @S@ ELSE '*' END, true);
	END IF;
]]):gsub("@(%u)@", { P = position, S = name })
end

local WAKE_AT_COMMIT_V10 = ([[
CREATE OR REPLACE FUNCTION projhost.wake_at_commit()
RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
	v_state text := coalesce(current_setting('projhost.wake', true), '');
	v_name text;
	v_epoch bigint;
	v_now bigint;
	v_void boolean;
BEGIN
	IF split_part(v_state, ' ', 1) = '' THEN
		-- no note pending: this row was announced already, or other SQL
		-- wrote it. NOTIFY payloads are capped at 8000 bytes: a longer
		-- name (an import by hand; appends allow 1024 bytes) is "some
		-- stream", never a commit that fails.
		v_name := CASE WHEN octet_length(NEW.stream_id) < 7900 THEN NEW.stream_id ELSE '*' END;
		IF NEW.last_position <= 0 OR substr(v_state, 2) IN ('*', v_name) THEN
			RETURN NULL;
		END IF;
		v_state := NEW.last_position || ' ' || CASE WHEN v_state = '' THEN v_name ELSE '*' END;
	ELSIF substr(v_state, strpos(v_state, ' ') + 1) NOT IN ('*', NEW.stream_id) AND NEW.last_position > 0 THEN
		-- a note pending that does not name this row's stream: a row of
		-- other SQL queued before the noted ones, announced with them
		v_state := greatest(NEW.last_position, split_part(v_state, ' ', 1)::bigint) || ' *';
	END IF;
	v_void := set_config('projhost.wake', substr(v_state, strpos(v_state, ' ')), true) IS NULL;
]] .. WAKE_LOCKS_AND_NOTIFY):gsub("@(%u+)@", { CLASS = M.WAKE_LOCK_CLASS, EPOCHS = M.WAKE_EPOCHS })

-- The step 4 bodies with their note, derived from those texts.
local APPEND_V10 = replace_once(replace_once(APPEND_V4,
	"\tv_problem text;\n", "\tv_problem text;\n\tv_noted text;\n"),
	"\tUPDATE projhost.streams\n", "\t-- announced at commit (see step 10)\n" ..
		wake_note_plpgsql("v_last", "p_stream") .. "\tUPDATE projhost.streams\n")
-- append_rows notes after the statement that writes the rows (under SET
-- CONSTRAINTS ALL IMMEDIATE their triggers have fired by then and
-- announced them as rows of other SQL; the note then is left unused)
local APPEND_ROWS_V10 = replace_once(replace_once(APPEND_ROWS,
	"\t\tELSE 'jsonb_array_elements($1) WITH ORDINALITY' END || ' AS t(e, ord)';\n",
	"\t\tELSE 'jsonb_array_elements($1) WITH ORDINALITY' END || ' AS t(e, ord)';\n" ..
	"\tv_noted text;\n\tv_name text;\n"),
	"\tSELECT coalesce(sum(n), 0)::bigint, max(last_position) FROM per_stream$q$, v_src)\n" ..
	"\t\tINTO events, last_position USING p_events;\n",
	"\tSELECT coalesce(sum(n), 0)::bigint, max(last_position),\n" ..
	"\t\tCASE WHEN count(*) = 1 THEN min(stream_id) ELSE '*' END FROM per_stream$q$, v_src)\n" ..
	"\t\tINTO events, last_position, v_name USING p_events;\n" ..
	"\tIF events > 0 THEN\n" .. wake_note_plpgsql("last_position", "v_name"):gsub("\n\t", "\n\t\t"):gsub("^\t", "\t\t") ..
	"\tEND IF;\n")

---------------------------------------------------------------------------
-- Lag, progress and read-your-writes (issue 13, step 5).
--
-- The database learns each projection's source: the worker writes a row of
-- projhost.sources when it sets a projection up (lifecycle.ensure_setup),
-- so any client can tell which events are a projection's own. Lag is then
-- counted from the tables alone:
--   unpartitioned  the events of its source, of its types and not emitted
--                  by itself, past its checkpoint (transaction, position):
--                  an index range from the checkpoint, counted up to
--                  M.BEHIND_CAP rows; past that, extrapolated over the
--                  positions left and labelled behind_estimated
--   partitioned    sum over its source's streams of stream version minus
--                  checkpoint version (0 without a row) = sum(streams.version)
--                  - sum(checkpoints.last_pos): two aggregates, no join
--                  (a join of 1,000,000 streams with their checkpoints took
--                  0.8-5 s, the two sums 0.3 s)
-- Seconds behind is the age of the oldest event not yet applied (created_at
-- is its transaction's start). Partitioned: looked for among the newest
-- M.LAG_WINDOW events of the source (exact when all the events behind are
-- there), else the oldest in position order among the first M.LAG_WINDOW
-- (exact when one is found), else a lower bound (behind_estimated).
-- Rates come from projhost.samples, which workers fill with their applied
-- counts at most every few seconds (lifecycle.report) and prune.
M.BEHIND_CAP = 50000
M.LAG_WINDOW = 2000

-- A source as SQL over projhost.events (one home of it on the server side;
-- projhost.reads is the worker's, and spec/integration/lag_spec.lua checks
-- they agree): range_sql = the index terms of the source (as in
-- reads.source_terms), visible_sql = its types and not its own emitted
-- events (as in reads.page_filter). Values are quoted literals, so the
-- planner sees them (a category's statistics) and nothing is spliced in.
-- (range_sql is an equality, as projhost.streams' reads need it; the
-- events' reads take projhost.events_range's, step 11.)
local SOURCE_FILTER = [[
CREATE OR REPLACE FUNCTION projhost.source_filter(p_kind text, p_value text, p_types text[], p_name text,
	p_own boolean, OUT range_sql text, OUT visible_sql text)
LANGUAGE sql IMMUTABLE AS $fn$
	SELECT CASE p_kind
			WHEN 'category' THEN format('split_part(stream_id, ''-'', 1) = %L', p_value)
			WHEN 'stream' THEN format('split_part(stream_id, ''-'', 1) = %L AND stream_id = %L',
				split_part(p_value, '-', 1), p_value)
			ELSE 'true' END,
		concat_ws(' AND ', 'true',
			CASE WHEN p_types IS NOT NULL THEN format('event_type = ANY (%L::text[])', p_types) END,
			CASE WHEN NOT coalesce(p_own, false) THEN
				format('split_part(metadata->>''projection'', ''@'', 1) IS DISTINCT FROM %L', p_name) END)
$fn$]]

-- Does a partitioned source read stream p_stream?
local SOURCE_READS = [[
CREATE OR REPLACE FUNCTION projhost.source_reads(p_kind text, p_value text, p_stream text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $fn$
	SELECT CASE p_kind WHEN 'category' THEN split_part(p_stream, '-', 1) = p_value
		WHEN 'stream' THEN p_stream = p_value ELSE true END
$fn$]]

-- Events behind an unpartitioned projection (see above). A projection
-- whose source is not known (no sources row: it has not run since step 5)
-- gets the old estimate, the top position minus its own (estimated).
local UNPARTITIONED_BEHIND = ([[
CREATE OR REPLACE FUNCTION projhost.unpartitioned_behind(p_projection text,
	OUT events bigint, OUT estimated boolean, OUT oldest timestamptz)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off AS $fn$
DECLARE
	s projhost.sources;
	c record;
	f record;
	v_walked bigint;
	v_last bigint;
	v_top bigint;
BEGIN
	SELECT * INTO s FROM projhost.sources WHERE projection = p_projection;
	SELECT last_tx, last_pos INTO c FROM projhost.checkpoints WHERE projection = p_projection AND partition = '';
	IF s.projection IS NULL OR c.last_pos IS NULL THEN
		SELECT coalesce(max(global_position), 0) INTO v_top FROM projhost.events;
		events := greatest(v_top - coalesce(c.last_pos, 0), 0);
		estimated := true;
		RETURN;
	END IF;
	f := projhost.source_filter(s.kind, s.value, s.types, s.name, s.own_events);
	EXECUTE format($q$SELECT count(*), count(*) FILTER (WHERE v), max(global_position), min(created_at) FILTER (WHERE v)
		FROM (SELECT global_position, created_at, %s AS v FROM projhost.events
			WHERE %s AND (transaction_id, global_position) > ($1, $2)
			ORDER BY transaction_id, global_position LIMIT @CAP@) w$q$, f.visible_sql, f.range_sql)
		INTO v_walked, events, v_last, oldest USING c.last_tx, c.last_pos;
	estimated := v_walked >= @CAP@;
	IF estimated THEN
		-- the share of the source's events among the positions walked,
		-- over the positions left to the top
		SELECT max(global_position) INTO v_top FROM projhost.events;
		events := events + (events::numeric * greatest(v_top - v_last, 0)
			/ greatest(v_last - c.last_pos, 1))::bigint;
	END IF;
END
$fn$]]):gsub("@CAP@", tostring(M.BEHIND_CAP))

-- The oldest event not yet applied among a partitioned projection's
-- p_events behind (see above): oldest, and whether it is only a lower bound.
local PARTITIONED_OLDEST = ([[
CREATE OR REPLACE FUNCTION projhost.partitioned_oldest(p_projection text, p_range text, p_events bigint,
	OUT oldest timestamptz, OUT estimated boolean)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off AS $fn$
DECLARE
	v_n bigint;
	v_min timestamptz;
	v_window timestamptz;
BEGIN
	estimated := false;
	-- the newest events first: a projection a little behind has them all there
	EXECUTE format($q$SELECT count(*) FILTER (WHERE behind), min(created_at) FILTER (WHERE behind), min(created_at)
		FROM (SELECT e.created_at, e.stream_version > coalesce((SELECT c.last_pos FROM projhost.checkpoints c
			WHERE c.projection = $1 AND c.partition = e.stream_id), 0) AS behind
		FROM (SELECT stream_id, stream_version, created_at FROM projhost.events WHERE %s
			ORDER BY global_position DESC LIMIT @WINDOW@) e) w$q$, p_range)
		INTO v_n, oldest, v_window USING p_projection;
	IF v_n >= p_events THEN RETURN; END IF;
	-- some are older: the first of them in position order, if near the start
	EXECUTE format($q$SELECT e.created_at FROM (SELECT stream_id, stream_version, created_at, global_position
			FROM projhost.events WHERE %s ORDER BY global_position LIMIT @WINDOW@) e
		WHERE e.stream_version > coalesce((SELECT c.last_pos FROM projhost.checkpoints c
			WHERE c.projection = $1 AND c.partition = e.stream_id), 0)
		ORDER BY e.global_position LIMIT 1$q$, p_range)
		INTO v_min USING p_projection;
	IF v_min IS NOT NULL THEN
		oldest := v_min;
	ELSE
		-- the others are older than every event of the window: a lower bound
		oldest := least(oldest, v_window);
		estimated := true;
	END IF;
END
$fn$]]):gsub("@WINDOW@", tostring(M.LAG_WINDOW))

-- Step 11: a source's range over projhost.events as the worker's reads
-- walk it (projhost.reads' source_terms and order_of, issue 11): where_sql
-- the terms, key_sql the category index's key before (transaction_id,
-- global_position) in an ORDER BY. `= ANY (ARRAY[...])` keeps the planner
-- from dropping the category from the ORDER BY and walking the store's
-- (transaction_id, global_position) index past every other category; on a
-- store imported in one transaction it did, once the checkpoint was inside
-- that transaction (a status of a 1% category among 3,000,000 events:
-- 0.3 s, every look). Not for projhost.streams: there an equality keeps
-- streams_category_idx in stream_id order (source_filter's range_sql).
local EVENTS_RANGE = [[
CREATE FUNCTION projhost.events_range(p_kind text, p_value text, OUT where_sql text, OUT key_sql text)
LANGUAGE sql IMMUTABLE AS $fn$
	SELECT CASE p_kind
			WHEN 'category' THEN format('split_part(stream_id, ''-'', 1) = ANY (ARRAY[%L])', p_value)
			WHEN 'stream' THEN format('split_part(stream_id, ''-'', 1) = ANY (ARRAY[%L]) AND stream_id = %L',
				split_part(p_value, '-', 1), p_value)
			ELSE 'true' END,
		CASE WHEN p_kind IN ('category', 'stream') THEN 'split_part(stream_id, ''-'', 1), ' ELSE '' END
$fn$]]

local UNPARTITIONED_BEHIND_V11 = replace_once(replace_once(replace_once(UNPARTITIONED_BEHIND,
	"\tf record;\n", "\tf record;\n\tk record;\n"),
	"\tf := projhost.source_filter(s.kind, s.value, s.types, s.name, s.own_events);\n",
	"\tf := projhost.source_filter(s.kind, s.value, s.types, s.name, s.own_events);\n"
		.. "\tk := projhost.events_range(s.kind, s.value);\n"),
	"ORDER BY transaction_id, global_position LIMIT " .. M.BEHIND_CAP .. ") w$q$, f.visible_sql, f.range_sql)",
	"ORDER BY %s transaction_id, global_position LIMIT " .. M.BEHIND_CAP
		.. ") w$q$, f.visible_sql, k.where_sql, k.key_sql)")

-- Events behind a partitioned projection; p_done = sum of its partitions'
-- versions (the caller has scanned them already). oldest: see above.
local PARTITIONED_BEHIND = [[
CREATE OR REPLACE FUNCTION projhost.partitioned_behind(p_projection text, p_done bigint,
	OUT events bigint, OUT estimated boolean, OUT oldest timestamptz)
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
	s projhost.sources;
	v_total bigint;
	o record;
BEGIN
	SELECT * INTO s FROM projhost.sources WHERE projection = p_projection;
	estimated := false;
	IF s.projection IS NULL THEN
		-- source unknown: the streams it has partitions of
		SELECT coalesce(sum(greatest(st.version - c.last_pos, 0)), 0) INTO events
		FROM projhost.checkpoints c JOIN projhost.streams st ON st.stream_id = c.partition
		WHERE c.projection = p_projection AND c.partition <> '';
		estimated := true;
		RETURN;
	END IF;
	-- split_part, not a key range: exact in any collation; a scan of the
	-- streams table either way. EXECUTE: a static statement of PL/pgSQL
	-- ran without parallel workers here (0.25 s at 1,000,000 streams, 0.15)
	EXECUTE 'SELECT coalesce(sum(version), 0)::bigint FROM projhost.streams WHERE ' || CASE s.kind
		WHEN 'category' THEN format('split_part(stream_id, ''-'', 1) = %L', s.value)
		WHEN 'stream' THEN format('stream_id = %L', s.value) ELSE 'true' END
		INTO v_total;
	events := greatest(v_total - coalesce(p_done, 0), 0);
	IF events = 0 THEN RETURN; END IF;
	IF s.kind = 'stream' THEN
		SELECT e.created_at INTO oldest FROM projhost.events e
		WHERE e.stream_id = s.value AND e.stream_version = 1 + coalesce((SELECT c.last_pos
			FROM projhost.checkpoints c WHERE c.projection = p_projection AND c.partition = s.value), 0);
		RETURN;
	END IF;
	o := projhost.partitioned_oldest(p_projection,
		(projhost.source_filter(s.kind, s.value, NULL, s.name, true)).range_sql, events);
	oldest := o.oldest;
	estimated := o.estimated;
END
$fn$]]

-- Every figure of every projection (p_projection NULL: all of them), the
-- one home of them: projection_status (the contract's columns) and
-- status_json are views of it. A projection is every name projhost.checkpoints
-- holds (NAME, and NAME@V while V rebuilds in the shadow).
local LAG_ROWS = [[
CREATE OR REPLACE FUNCTION projhost.lag_rows(p_projection text, p_stall_after double precision)
RETURNS TABLE (projection text, status text, partitioned boolean, partitions bigint,
	failed bigint, paused bigint, stopped bigint, events_behind bigint, behind_estimated boolean,
	lag_seconds double precision, applied_1m bigint, rate_1m double precision,
	eta_seconds double precision, parked bigint, stalled boolean, "position" bigint,
	error text, updated_at timestamptz,
	running bigint, reset_pending boolean, progress double precision, shadow_of text,
	source_kind text, source_value text, source_types text[], version int,
	done bigint, held bigint)
-- short queries over big tables: compiling them costs more than running
LANGUAGE plpgsql STABLE SET jit = off AS $fn$
#variable_conflict use_column
DECLARE
	r projhost.checkpoint_totals;
	v_all projhost.checkpoint_totals[];
	v_own bigint;
	s projhost.sources;
	b record;
	v_since timestamptz;
	v_window double precision;
	v_done bigint;
BEGIN
	IF p_stall_after IS NULL OR NOT p_stall_after >= 0 OR p_stall_after = 'Infinity' THEN
		RAISE EXCEPTION 'projhost.projection_status: stall_after must be a number of seconds >= 0, not %',
			p_stall_after USING ERRCODE = '22023';
	END IF;
	-- one statement (SELECT INTO, not a FOR loop's cursor: that rules out a
	-- parallel scan, 0.45 s instead of 0.3 s over 1,000,000 checkpoints),
	-- with as few aggregates as will do (each costs per row)
	-- (EXECUTE: see partitioned_behind)
	EXECUTE $q$SELECT array_agg(ROW(a.projection, a.n, a.parts, a.version, a.pos, a.done,
			a.moved)::projhost.checkpoint_totals ORDER BY a.projection)
		FROM (SELECT c.projection, count(*) AS n, count(*) FILTER (WHERE c.partition <> '') AS parts,
				min(c.version) AS version, max(c.last_pos) AS pos, sum(c.last_pos)::bigint AS done,
				max(c.updated_at) AS moved
			FROM projhost.checkpoints c$q$
		|| CASE WHEN p_projection IS NOT NULL THEN ' WHERE c.projection = $1' ELSE '' END
		|| ' GROUP BY c.projection) a'
		INTO v_all USING p_projection;
	FOREACH r IN ARRAY coalesce(v_all, '{}') LOOP
		-- the rows not running: few, and indexed (checkpoints_status_idx)
		SELECT count(*) FILTER (WHERE c.status = 'paused'), count(*) FILTER (WHERE c.status = 'failed'),
			count(*) FILTER (WHERE c.status = 'stopped'), count(*) FILTER (WHERE c.status = 'done'),
			count(*) FILTER (WHERE c.status = 'held')
		INTO paused, failed, stopped, done, held
		FROM projhost.checkpoints c WHERE c.projection = r.name AND c.status <> 'running';
		s := NULL;
		SELECT * INTO s FROM projhost.sources WHERE projection = r.name;
		projection := r.name;
		partitioned := coalesce(s.partitioned, r.parts > 0);
		partitions := CASE WHEN partitioned THEN r.parts ELSE 1 END;
		running := r.n - paused - failed - stopped - done - held;
		-- `projhost reset` sets the version to 0 (the worker resets it)
		reset_pending := r.version = 0;
		SELECT c.version, c.last_pos INTO version, v_own FROM projhost.checkpoints c
		WHERE c.projection = r.name AND c.partition = '';
		"position" := r.pos;
		-- the latest error (an aggregate ordered by time sorted every row:
		-- 2 s at 1,000,000 partitions; the partial index holds only these)
		SELECT CASE WHEN c.partition = '' THEN c.error ELSE c.partition || ': ' || c.error END INTO error
		FROM projhost.checkpoints c WHERE c.projection = r.name AND c.error IS NOT NULL
		ORDER BY c.updated_at DESC LIMIT 1;
		updated_at := r.moved;
		shadow_of := s.shadow_of;
		source_kind := s.kind;
		source_value := s.value;
		source_types := s.types;
		IF partitioned THEN
			-- the projection's own row is not a partition
			v_done := coalesce(r.done, 0) - coalesce(v_own, 0);
			b := projhost.partitioned_behind(r.name, v_done);
		ELSE
			b := projhost.unpartitioned_behind(r.name);
			v_done := s.applied;
		END IF;
		events_behind := b.events;
		behind_estimated := b.estimated;
		-- NULL: not known (a source not known)
		lag_seconds := CASE WHEN b.events = 0 THEN 0 WHEN b.oldest IS NOT NULL
			THEN greatest(extract(epoch FROM now() - b.oldest)::double precision, 0) END;
		SELECT coalesce(sum(m.n), 0), min(m.since) INTO applied_1m, v_since FROM projhost.samples m
		WHERE m.projection = r.name AND m.at > now() - interval '60 seconds';
		v_window := least(60, greatest(1, extract(epoch FROM now() - v_since)::double precision));
		rate_1m := CASE WHEN applied_1m > 0 THEN applied_1m / v_window ELSE 0 END;
		eta_seconds := CASE WHEN b.events = 0 THEN 0 WHEN rate_1m > 0 THEN b.events / rate_1m END;
		progress := CASE WHEN b.events = 0 THEN 100
			WHEN v_done IS NOT NULL THEN 100.0 * v_done / (v_done + b.events) END;
		SELECT count(*) INTO parked FROM projhost.parked k WHERE k.projection = r.name;
		status := CASE WHEN failed > 0 THEN 'failed' WHEN stopped > 0 THEN 'stopped'
			WHEN paused > 0 THEN 'paused' END;
		-- behind, and nothing applied for p_stall_after seconds since there
		-- was something to apply (an event that came to an idle
		-- projection a moment ago has not stalled it)
		stalled := status IS NULL AND b.events > 0
			AND extract(epoch FROM now() - greatest(r.moved, coalesce(b.oldest, r.moved))) > p_stall_after;
		status := coalesce(status, CASE WHEN stalled THEN 'stalled'
			WHEN s.shadow_of IS NOT NULL OR r.name LIKE '%@%' THEN 'rebuilding' ELSE 'running' END);
		RETURN NEXT;
	END LOOP;
END
$fn$]]

local PROJECTION_STATUS = [[
CREATE OR REPLACE FUNCTION projhost.projection_status(p_projection text DEFAULT NULL,
	p_stall_after double precision DEFAULT 60)
RETURNS TABLE (projection text, status text, partitioned boolean, partitions bigint,
	failed bigint, paused bigint, stopped bigint, events_behind bigint, behind_estimated boolean,
	lag_seconds double precision, applied_1m bigint, rate_1m double precision,
	eta_seconds double precision, parked bigint, stalled boolean, "position" bigint,
	error text, updated_at timestamptz)
LANGUAGE sql STABLE AS $fn$
	SELECT l.projection, l.status, l.partitioned, l.partitions, l.failed, l.paused, l.stopped,
		l.events_behind, l.behind_estimated, l.lag_seconds, l.applied_1m, l.rate_1m, l.eta_seconds,
		l.parked, l.stalled, l."position", l.error, l.updated_at
	FROM projhost.lag_rows(p_projection, p_stall_after) l
$fn$]]

-- The oldest transaction anywhere in the cluster that holds the xmin
-- horizon back (design §2: it delays every projection).
local HORIZON = [[
CREATE OR REPLACE FUNCTION projhost.horizon()
RETURNS TABLE (pid int, database text, state text, query text, age_s numeric)
LANGUAGE sql STABLE AS $fn$
	SELECT a.pid, a.datname::text, a.state, left(a.query, 60),
		round(extract(epoch FROM clock_timestamp() - a.xact_start)::numeric, 1)
	FROM pg_stat_activity a
	WHERE (a.backend_xid IS NOT NULL OR a.backend_xmin IS NOT NULL)
		AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
	ORDER BY a.xact_start
	LIMIT 1
$fn$]]

-- The document of `projhost status --json` and the master's GET /status.
local STATUS_JSON = [[
CREATE OR REPLACE FUNCTION projhost.status_json(p_projection text DEFAULT NULL,
	p_stall_after double precision DEFAULT 60)
RETURNS jsonb LANGUAGE sql STABLE AS $fn$
	SELECT jsonb_build_object(
		'projections', coalesce((SELECT jsonb_agg(jsonb_build_object(
			'name', l.projection,
			'status', l.status,
			'partitioned', l.partitioned,
			'partitions', l.partitions,
			'statuses', jsonb_build_object('running', l.running, 'paused', l.paused,
				'failed', l.failed, 'stopped', l.stopped, 'done', l.done, 'held', l.held),
			'events_behind', l.events_behind,
			'behind', l.events_behind,
			'behind_estimated', l.behind_estimated,
			'lag_seconds', round(l.lag_seconds::numeric, 3),
			'applied_1m', l.applied_1m,
			'rate_1m', round(l.rate_1m::numeric, 1),
			'eta_seconds', round(l.eta_seconds::numeric, 1),
			'progress', round(l.progress::numeric, 1),
			'parked', l.parked,
			'stalled', l.stalled,
			'position', l."position",
			'version', l.version,
			'shadow_of', l.shadow_of,
			'source', CASE WHEN l.source_kind IS NOT NULL THEN jsonb_build_object('kind', l.source_kind,
				'value', l.source_value, 'types', to_jsonb(l.source_types)) END,
			'error', l.error,
			'updated_at', to_char(l.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
			'reset_pending', l.reset_pending) ORDER BY l.projection)
			FROM projhost.lag_rows(p_projection, p_stall_after) l), '[]'::jsonb),
		'horizon', (SELECT to_jsonb(h) FROM projhost.horizon() h),
		'parked', (SELECT count(*) FROM projhost.parked),
		'events', coalesce((SELECT max(global_position) FROM projhost.events), 0),
		'stall_after', p_stall_after,
		'time', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
$fn$]]

-- Read-your-writes. Has p_projection handled the event p_stream@p_version?
-- 'applied' | 'parked' | 'skipped' (by its on_error or an operator) |
-- 'ignored' (its partition is done: ctx:done) | 'pending'. Exact,
-- and immune to gaps: partitioned, the partition's checkpoint (a stream
-- version) against the version; unpartitioned, no event the projection
-- reads lies between its checkpoint (transaction, position) and the
-- event's own (transaction, position) - the event included, so an event
-- it does not read (another type, another category) is handled once
-- everything it reads before it is. Raises 22023 for a NULL argument, a
-- version < 1 or a stream a partitioned projection does not read, 42704
-- for a projection nothing knows, P0002 when the event does not exist.
local APPLIED = [[
CREATE OR REPLACE FUNCTION projhost.applied(p_projection text, p_stream text, p_version bigint)
RETURNS text LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off AS $fn$
DECLARE
	s projhost.sources;
	c record;
	e record;
	f record;
	v_partitioned boolean;
	v_pending boolean;
BEGIN
	IF p_projection IS NULL OR p_stream IS NULL OR p_version IS NULL OR p_version < 1 THEN
		RAISE EXCEPTION 'projhost.applied: a projection, a stream and a version >= 1 are needed, not (%, %, %)',
			coalesce(quote_literal(p_projection), 'NULL'), coalesce(quote_literal(p_stream), 'NULL'),
			coalesce(p_version::text, 'NULL') USING ERRCODE = '22023';
	END IF;
	SELECT * INTO s FROM projhost.sources WHERE projection = p_projection;
	SELECT last_tx, last_pos INTO c FROM projhost.checkpoints WHERE projection = p_projection AND partition = '';
	IF c.last_pos IS NULL AND s.projection IS NULL
		AND NOT EXISTS (SELECT 1 FROM projhost.checkpoints WHERE projection = p_projection) THEN
		RAISE EXCEPTION 'projhost.applied: no projection named %', quote_literal(p_projection)
			USING ERRCODE = '42704';
	END IF;
	SELECT global_position, transaction_id INTO e FROM projhost.events
	WHERE stream_id = p_stream AND stream_version = p_version;
	IF e.global_position IS NULL THEN
		RAISE EXCEPTION 'projhost.applied: stream % has no event at version %', quote_literal(p_stream), p_version
			USING ERRCODE = 'P0002';
	END IF;
	v_partitioned := coalesce(s.partitioned, EXISTS (SELECT 1 FROM projhost.checkpoints
		WHERE projection = p_projection AND partition <> ''));
	IF v_partitioned THEN
		IF s.projection IS NOT NULL AND NOT projhost.source_reads(s.kind, s.value, p_stream) THEN
			RAISE EXCEPTION 'projhost.applied: projection % (partitioned, % %) does not read stream %',
				quote_literal(p_projection), s.kind, quote_literal(s.value), quote_literal(p_stream)
				USING ERRCODE = '22023';
		END IF;
		SELECT last_pos, status INTO f FROM projhost.checkpoints
		WHERE projection = p_projection AND partition = p_stream;
		-- a partition its handler marked done (ctx:done, issue 14) never
		-- applies its later events: handled, as ignored
		IF f.status = 'done' AND f.last_pos < p_version THEN RETURN 'ignored'; END IF;
		v_pending := coalesce(f.last_pos, 0) < p_version;
	ELSIF c.last_pos IS NULL THEN
		v_pending := true;
	ELSIF (e.transaction_id, e.global_position) <= (c.last_tx, c.last_pos) THEN
		v_pending := false;
	ELSIF s.projection IS NULL THEN
		v_pending := true;
	ELSE
		f := projhost.source_filter(s.kind, s.value, s.types, s.name, s.own_events);
		EXECUTE format($q$SELECT EXISTS (SELECT 1 FROM projhost.events WHERE %s AND %s
			AND (transaction_id, global_position) > ($1, $2) AND (transaction_id, global_position) <= ($3, $4))$q$,
			f.range_sql, f.visible_sql)
			INTO v_pending USING c.last_tx, c.last_pos, e.transaction_id, e.global_position;
	END IF;
	IF v_pending THEN RETURN 'pending'; END IF;
	IF EXISTS (SELECT 1 FROM projhost.parked WHERE projection = p_projection AND global_position = e.global_position) THEN
		RETURN 'parked';
	END IF;
	IF EXISTS (SELECT 1 FROM projhost.skipped WHERE projection = p_projection AND global_position = e.global_position) THEN
		RETURN 'skipped';
	END IF;
	RETURN 'applied';
END
$fn$]]

-- Step 11: the source's events between the checkpoint and the event in
-- its range (see "Step 11:"; a scalar subquery, as an EXISTS would drop the
-- ORDER BY that keeps the planner on it)
local APPLIED_V11 = replace_once(replace_once(APPLIED, "\tf record;\n", "\tf record;\n\tk record;\n"), [[
		f := projhost.source_filter(s.kind, s.value, s.types, s.name, s.own_events);
		EXECUTE format($q$SELECT EXISTS (SELECT 1 FROM projhost.events WHERE %s AND %s
			AND (transaction_id, global_position) > ($1, $2) AND (transaction_id, global_position) <= ($3, $4))$q$,
			f.range_sql, f.visible_sql)
			INTO v_pending USING c.last_tx, c.last_pos, e.transaction_id, e.global_position;
]], [[
		f := projhost.source_filter(s.kind, s.value, s.types, s.name, s.own_events);
		k := projhost.events_range(s.kind, s.value);
		EXECUTE format($q$SELECT (SELECT true FROM projhost.events WHERE %s AND %s
			AND (transaction_id, global_position) > ($1, $2) AND (transaction_id, global_position) <= ($3, $4)
			ORDER BY %s transaction_id, global_position LIMIT 1) IS NOT NULL$q$,
			k.where_sql, f.visible_sql, k.key_sql)
			INTO v_pending USING c.last_tx, c.last_pos, e.transaction_id, e.global_position;
]])

-- applied() until it is not 'pending' (true) or p_timeout_ms passed
-- (false). Each look is a statement of its own, so it sees what committed
-- since (READ COMMITTED; REPEATABLE READ would never see the batch: 25000).
-- Raises 25000 too when the event is the caller's own uncommitted write.
-- While it waits its snapshot holds VACUUM's horizon (not the projections',
-- which only transactions with an xid hold back).
local WAIT_FOR = [[
CREATE OR REPLACE FUNCTION projhost.wait_for(p_projection text, p_stream text, p_version bigint, p_timeout_ms int)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
	v_deadline timestamptz;
	v_sleep double precision := 0.001;
BEGIN
	IF p_timeout_ms IS NULL OR p_timeout_ms < 0 THEN
		RAISE EXCEPTION 'projhost.wait_for: timeout_ms must be >= 0, not %', coalesce(p_timeout_ms::text, 'NULL')
			USING ERRCODE = '22023';
	END IF;
	v_deadline := clock_timestamp() + p_timeout_ms * interval '1 millisecond';
	IF projhost.applied(p_projection, p_stream, p_version) <> 'pending' THEN RETURN true; END IF;
	IF EXISTS (SELECT 1 FROM projhost.events WHERE stream_id = p_stream AND stream_version = p_version
		AND transaction_id = pg_current_xact_id_if_assigned()) THEN
		RAISE EXCEPTION 'projhost.wait_for: %@% was written by this transaction, which no projection can see '
			'before it commits', p_stream, p_version USING ERRCODE = '25000';
	END IF;
	IF current_setting('transaction_isolation') <> 'read committed' AND p_timeout_ms > 0 THEN
		RAISE EXCEPTION 'projhost.wait_for: needs READ COMMITTED (under % its snapshot never sees the batch commit)',
			current_setting('transaction_isolation') USING ERRCODE = '25000';
	END IF;
	LOOP
		EXIT WHEN clock_timestamp() >= v_deadline;
		PERFORM pg_sleep(least(v_sleep, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0)));
		v_sleep := least(v_sleep * 2, 0.01);
		IF projhost.applied(p_projection, p_stream, p_version) <> 'pending' THEN RETURN true; END IF;
	END LOOP;
	RETURN false;
END
$fn$]]

-- wait_for without an event: until p_projection has applied everything
-- committed before the call (true), or p_timeout_ms passed (false).
-- Unpartitioned: the last event it reads, in its order, then as wait_for.
-- Partitioned: each stream of its source that is behind now, up to its
-- version now (kept in a temporary table, which shrinks as they catch up).
local WAIT_ALL = [[
CREATE OR REPLACE FUNCTION projhost.wait_all(p_projection text, p_timeout_ms int)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
	s projhost.sources;
	f record;
	t record;
	v_left bigint;
	v_deadline timestamptz;
	v_sleep double precision := 0.001;
BEGIN
	IF p_timeout_ms IS NULL OR p_timeout_ms < 0 THEN
		RAISE EXCEPTION 'projhost.wait_all: timeout_ms must be >= 0, not %', coalesce(p_timeout_ms::text, 'NULL')
			USING ERRCODE = '22023';
	END IF;
	v_deadline := clock_timestamp() + p_timeout_ms * interval '1 millisecond';
	SELECT * INTO s FROM projhost.sources WHERE projection = p_projection;
	IF s.projection IS NULL THEN
		RAISE EXCEPTION 'projhost.wait_all: no projection named % has run with a known source',
			quote_literal(p_projection) USING ERRCODE = '42704';
	END IF;
	IF NOT s.partitioned THEN
		f := projhost.source_filter(s.kind, s.value, s.types, s.name, s.own_events);
		EXECUTE format($q$SELECT stream_id, stream_version FROM projhost.events WHERE %s AND %s
			ORDER BY transaction_id DESC, global_position DESC LIMIT 1$q$, f.range_sql, f.visible_sql) INTO t;
		IF t.stream_id IS NULL THEN RETURN true; END IF;
		RETURN projhost.wait_for(p_projection, t.stream_id, t.stream_version,
			greatest(0, extract(epoch FROM v_deadline - clock_timestamp()) * 1000)::int);
	END IF;
	DROP TABLE IF EXISTS pg_temp.projhost_wait;
	CREATE TEMPORARY TABLE projhost_wait ON COMMIT DROP AS
		SELECT st.stream_id, st.version FROM projhost.streams st
		LEFT JOIN projhost.checkpoints c ON c.projection = p_projection AND c.partition = st.stream_id
		WHERE projhost.source_reads(s.kind, s.value, st.stream_id) AND st.version > coalesce(c.last_pos, 0);
	LOOP
		DELETE FROM pg_temp.projhost_wait w USING projhost.checkpoints c
		WHERE c.projection = p_projection AND c.partition = w.stream_id AND c.last_pos >= w.version;
		SELECT count(*) INTO v_left FROM pg_temp.projhost_wait;
		IF v_left = 0 THEN RETURN true; END IF;
		EXIT WHEN clock_timestamp() >= v_deadline;
		PERFORM pg_sleep(least(v_sleep, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0)));
		v_sleep := least(v_sleep * 2, 0.05);
	END LOOP;
	RETURN false;
END
$fn$]]

-- Per partition: its checkpoint (version = the stream version applied),
-- when it was last processed, status, error, events behind (stream version
-- minus checkpoint version). A partitioned projection has a row per stream
-- it has processed: a stream of its source it has not started yet has none
-- (finding those takes a join of every stream with the checkpoints: 0.8 s
-- at 1,000,000), though its events count in events_behind. An unpartitioned
-- projection has one row, partition '' (version = its checkpoint's
-- position, behind as in projection_status).
local PARTITION_STATUS = [[
CREATE OR REPLACE VIEW projhost.partition_status AS
	SELECT c.projection, c.partition, c.last_pos AS version, c.updated_at AS processed_at, c.status, c.error,
		CASE WHEN c.partition <> '' THEN greatest(coalesce(st.version, 0) - c.last_pos, 0)
			ELSE (projhost.unpartitioned_behind(c.projection)).events END AS behind
	FROM projhost.checkpoints c
	LEFT JOIN projhost.streams st ON st.stream_id = c.partition AND c.partition <> ''
	-- one relation, no UNION: a listing in key order with a LIMIT stays
	-- a walk of the checkpoints' key (a UNION was sorted whole: 2.9 s)
	WHERE c.partition <> '' OR NOT coalesce((SELECT s.partitioned FROM projhost.sources s
		WHERE s.projection = c.projection), EXISTS (SELECT 1 FROM projhost.checkpoints c2
		WHERE c2.projection = c.projection AND c2.partition <> ''))
]]

-- A worker's applied count since p_since: a sample for the rates, the
-- projection's running total (for a rebuild's progress), and samples older
-- than ten minutes pruned. Returns whether a progress line is due (at most
-- one every p_every seconds per projection, whichever worker or instance
-- asks first).
local NOTE_APPLIED = [[
CREATE OR REPLACE FUNCTION projhost.note_applied(p_projection text, p_n bigint, p_since timestamptz,
	p_every double precision)
RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
	v_due boolean;
BEGIN
	IF p_n > 0 THEN
		INSERT INTO projhost.samples (projection, since, n) VALUES (p_projection, least(p_since, now()), p_n);
	END IF;
	DELETE FROM projhost.samples WHERE projection = p_projection AND at < now() - interval '10 minutes';
	UPDATE projhost.sources SET applied = applied + greatest(p_n, 0),
		progress_at = CASE WHEN p_every IS NOT NULL AND (progress_at IS NULL
			OR progress_at <= now() - p_every * interval '1 second') THEN now() ELSE progress_at END
	WHERE projection = p_projection
	RETURNING progress_at = now() AND p_every IS NOT NULL INTO v_due;
	RETURN coalesce(v_due, false);
END
$fn$]]

-- Projections that became stalled since the last call, once each (for a
-- log line: whoever calls it logs them - the workers, every few seconds);
-- a projection that is no longer stalled is forgotten, so the next stall is
-- reported again. p_every: nothing is looked at when another caller looked
-- less than p_every seconds ago.
local STALL_NEWS = [[
CREATE OR REPLACE FUNCTION projhost.stall_news(p_stall_after double precision DEFAULT 60,
	p_every double precision DEFAULT 0)
RETURNS TABLE (projection text, events_behind bigint, lag_seconds double precision, updated_at timestamptz)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
	r record;
BEGIN
	-- one look per p_every seconds, whoever calls (workers of every instance)
	UPDATE projhost.stall_check SET at = now() WHERE at <= now() - p_every * interval '1 second';
	IF NOT FOUND THEN RETURN; END IF;
	FOR r IN SELECT l.projection, l.stalled, l.events_behind, l.lag_seconds, l.updated_at
		FROM projhost.lag_rows(NULL, p_stall_after) l
	LOOP
		IF r.stalled THEN
			UPDATE projhost.sources SET stalled_since = now()
			WHERE sources.projection = r.projection AND stalled_since IS NULL;
			IF FOUND THEN
				projection := r.projection;
				events_behind := r.events_behind;
				lag_seconds := r.lag_seconds;
				updated_at := r.updated_at;
				RETURN NEXT;
			END IF;
		ELSE
			UPDATE projhost.sources SET stalled_since = NULL
			WHERE sources.projection = r.projection AND stalled_since IS NOT NULL;
		END IF;
	END LOOP;
END
$fn$]]

---------------------------------------------------------------------------
-- The partitions behind (issue 13: `status NAME --behind` at 1,000,000
-- partitions, few of them behind, in under a second).
--
-- Comparing every partition with its stream is one join of the two tables:
-- 1.2-2 s at 1,000,000 (a hash join; a walk in key order with a lookup per
-- stream, stopping at a LIMIT that few partitions behind never reach, 5 s).
-- projhost.partitions_behind looks only where they can be instead, and
-- knows when it has seen them all from the exact events_behind E of the
-- projection (lag_rows: the sum of its streams' versions minus the sum of
-- its checkpoints', done partitions aside). Every partition behind adds
-- its stream version minus checkpoint version (> 0) to E, every other
-- adds 0 (no checkpoint is past its stream, which E relies on too), so
-- once the partitions found add up to E there are no others:
--   1. the checkpoints not running and not done (failed, paused, stopped,
--      held: checkpoints_status_idx), when there are at most M.BEHIND_FEW
--      of them (a paused projection has all of them paused: then step 2
--      looks at those too);
--   2. the source's events, newest first (its index range, as the worker's
--      windows read them), in growing chunks: a stream is behind when its
--      last event (stream version) is past its checkpoint, found there
--      with the whole of its lag at once, so a stream with a long backlog
--      costs one event; until what was found adds up to E, and at most
--      M.BEHIND_WINDOW events. A partition a little behind has its last
--      event among the newest (10 or 1,000 of 1,000,000 behind: a few ms);
--   3. when a limit is asked and step 2's share of streams behind says a
--      walk of the source's streams in key order (a checkpoint lookup
--      each) would reach the limit in fewer streams than its next chunk
--      has events: that walk, a page of streams at a time, what it finds
--      returned at once (in key order, the start of the answer); at most
--      four times the streams expected (20,000 to M.BEHIND_WINDOW), then
--      step 4 for the streams after it (100,000 of 1,000,000 behind: the
--      walk reads some hundreds of streams);
--   4. else (step 2 ran out of window or events before E was accounted
--      for: partitions behind whose last event is old among many newer
--      ones applied; a source not known): the join of every stream with
--      its checkpoint, as before - exact, and the slow case (1.2-2 s at
--      1,000,000, after step 2's look).
-- Steps 1-3 need E of the same snapshot. lag_rows notes each projection's
-- (projhost.note_behind: a transaction-local setting of the session, with
-- the snapshot it counted in); `status NAME --behind` runs status_json and
-- partitions_behind in one REPEATABLE READ transaction, so E is counted
-- once (0.3 s at 1,000,000 partitions). Any other caller gets it counted.
M.BEHIND_FEW = 10000
M.BEHIND_WINDOW = 100000

-- p_snapshot (pg_current_snapshot()::text of the statement that counted)
-- and p_projection's events behind then, noted for partitions_behind. A
-- transaction that has written anything notes nothing: its own changes
-- are not in the snapshot's text. -> true
local NOTE_BEHIND = [[
CREATE FUNCTION projhost.note_behind(p_snapshot text, p_projection text, p_events bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
	IF pg_current_xact_id_if_assigned() IS NULL AND p_snapshot IS NOT NULL AND p_projection IS NOT NULL THEN
		PERFORM set_config('projhost.noted_behind', jsonb_build_object('snapshot', p_snapshot,
			'behind', coalesce(projhost.noted_behind(p_snapshot), '{}'::jsonb)
				|| jsonb_build_object(p_projection, p_events))::text, true);
	END IF;
	RETURN true;
END
$fn$]]

-- What note_behind noted in snapshot p_snapshot, {projection: events}, or
-- NULL (none, another snapshot, a transaction that has written since, or
-- the setting is not one note_behind wrote).
local NOTED_BEHIND = [[
CREATE FUNCTION projhost.noted_behind(p_snapshot text)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $fn$
DECLARE
	v jsonb;
BEGIN
	IF pg_current_xact_id_if_assigned() IS NOT NULL THEN RETURN NULL; END IF;
	BEGIN
		v := nullif(current_setting('projhost.noted_behind', true), '')::jsonb;
	EXCEPTION WHEN invalid_text_representation THEN
		RETURN NULL; -- set by hand to something else
	END;
	IF jsonb_typeof(v) = 'object' AND v->>'snapshot' = p_snapshot AND jsonb_typeof(v->'behind') = 'object' THEN
		RETURN v->'behind';
	END IF;
	RETURN NULL;
END
$fn$]]

-- lag_rows (step 5, kept as lag_rows_v5, the one home of the figures),
-- noting each projection's events behind
local LAG_ROWS_NOTED = [[
CREATE FUNCTION projhost.lag_rows(p_projection text, p_stall_after double precision)
RETURNS TABLE (projection text, status text, partitioned boolean, partitions bigint,
	failed bigint, paused bigint, stopped bigint, events_behind bigint, behind_estimated boolean,
	lag_seconds double precision, applied_1m bigint, rate_1m double precision,
	eta_seconds double precision, parked bigint, stalled boolean, "position" bigint,
	error text, updated_at timestamptz,
	running bigint, reset_pending boolean, progress double precision, shadow_of text,
	source_kind text, source_value text, source_types text[], version int,
	done bigint, held bigint)
LANGUAGE sql STABLE AS $fn$
	-- a partitioned projection's statuses count its partitions: step 5's
	-- counted its own row ('') among them too (running 2 of 2 partitions,
	-- one of them done); o is that row's status, looked up by key
	SELECT l.projection, l.status, l.partitioned, l.partitions,
		l.failed - coalesce((o = 'failed')::int, 0), l.paused - coalesce((o = 'paused')::int, 0),
		l.stopped - coalesce((o = 'stopped')::int, 0),
		l.events_behind, l.behind_estimated, l.lag_seconds, l.applied_1m, l.rate_1m, l.eta_seconds,
		l.parked, l.stalled, l."position", l.error, l.updated_at,
		l.running - coalesce((o = 'running')::int, 0), l.reset_pending, l.progress, l.shadow_of,
		l.source_kind, l.source_value, l.source_types, l.version,
		l.done - coalesce((o = 'done')::int, 0), l.held - coalesce((o = 'held')::int, 0)
	FROM projhost.lag_rows_v5(p_projection, p_stall_after) l
	CROSS JOIN LATERAL (SELECT CASE WHEN l.partitioned THEN (SELECT c.status FROM projhost.checkpoints c
		WHERE c.projection = l.projection AND c.partition = '') END AS o) own
	WHERE projhost.note_behind(pg_current_snapshot()::text, l.projection, l.events_behind)
$fn$]]

-- p_projection's partitions behind, in key order, p_limit at most (NULL:
-- all): partition, version (its checkpoint's; 0 without one),
-- processed_at, status (NULL: a stream of its source without a checkpoint
-- row yet), error, behind (stream version - version). A done partition is
-- never behind. The rows of projhost.partition_status with behind > 0,
-- plus the streams without a checkpoint row; an unpartitioned projection's
-- one row if it is behind. Raises 22023 for a limit < 0. See above.
local PARTITIONS_BEHIND = ([[
CREATE FUNCTION projhost.partitions_behind(p_projection text, p_limit bigint DEFAULT NULL)
RETURNS TABLE (partition text, version bigint, processed_at timestamptz, status text, error text,
	behind bigint)
LANGUAGE plpgsql STABLE
-- lag_rows below plans as usual; the steps set their own (restored on return)
SET jit = off SET enable_seqscan = on SET enable_bitmapscan = on SET enable_hashjoin = on
SET enable_mergejoin = on SET enable_nestloop = on SET enable_sort = on SET work_mem = '64MB' AS $fn$
#variable_conflict use_column
DECLARE
	s projhost.sources;
	f record;
	r record;
	v_events bigint;
	v_few boolean;
	v_parts text[] := '{}';
	v_behind bigint[] := '{}';
	v_left bigint;
	v_n bigint;
	v_seen bigint := 0;
	v_found bigint := 0;
	v_tx xid8 := '18446744073709551615';
	v_pos bigint := 9223372036854775807;
	v_chunk bigint := @CHUNK@;
	v_p text[];
	v_b bigint[];
	v_walk text;
	v_page text;
	v_after text := '';
	v_last text;
	v_rows bigint := p_limit;
	v_walked bigint := 0;
	v_budget double precision;
BEGIN
	IF p_limit < 0 THEN
		RAISE EXCEPTION 'projhost.partitions_behind: the limit must be >= 0 or NULL, not %', p_limit
			USING ERRCODE = '22023';
	END IF;
	SELECT * INTO s FROM projhost.sources x WHERE x.projection = p_projection;
	IF s.projection IS NOT NULL AND NOT s.partitioned THEN
		-- its one row (a lookup)
		RETURN QUERY SELECT ps.partition, ps.version, ps.processed_at, ps.status, ps.error, ps.behind
			FROM projhost.partition_status ps WHERE ps.projection = p_projection AND ps.behind > 0
			LIMIT p_limit;
		RETURN;
	END IF;
	IF s.projection IS NULL THEN
		-- a source not known (it has not run since step 5): its checkpoints
		-- (step 4's join)
		PERFORM set_config('enable_nestloop', 'off', true), set_config('enable_mergejoin', 'off', true);
		RETURN QUERY SELECT ps.partition, ps.version, ps.processed_at, ps.status, ps.error, ps.behind
			FROM projhost.partition_status ps WHERE ps.projection = p_projection AND ps.behind > 0
			ORDER BY ps.partition LIMIT p_limit;
		RETURN;
	END IF;
	v_events := (projhost.noted_behind(pg_current_snapshot()::text)->>p_projection)::bigint;
	IF v_events IS NULL THEN
		SELECT l.events_behind INTO v_events FROM projhost.lag_rows(p_projection, 0) l;
	END IF;
	IF v_events = 0 OR p_limit = 0 THEN RETURN; END IF;
	f := projhost.source_filter(s.kind, s.value, NULL, s.name, true);
	-- the source's streams in key order after $3, each with its checkpoint
	-- (steps 3, 4): a category's are a range of streams_category_idx, in
	-- any collation (see reads.walk_sql)
	v_walk := format($q$SELECT st.stream_id, coalesce(c.last_pos, 0), c.updated_at, c.status, c.error,
			st.version - coalesce(c.last_pos, 0)
		FROM projhost.streams st
		LEFT JOIN projhost.checkpoints c ON c.projection = $1 AND c.partition = st.stream_id
		WHERE %s AND st.stream_id > $3 AND st.version > coalesce(c.last_pos, 0)
			AND c.status IS DISTINCT FROM 'done'
		ORDER BY st.stream_id LIMIT $2$q$, f.range_sql);
	PERFORM set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true),
		set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true);
	IF s.kind = 'stream' THEN
		-- one stream: a lookup
		RETURN QUERY EXECUTE v_walk USING p_projection, p_limit, v_after;
		RETURN;
	END IF;
	IF v_events IS NOT NULL THEN
		-- 1. (checkpoints_status_idx's predicate: status <> 'running')
		SELECT count(*) <= @FEW@ INTO v_few FROM (SELECT 1 FROM projhost.checkpoints c
			WHERE c.projection = p_projection AND c.status <> 'running' LIMIT @FEW@ + 1) x;
		IF v_few THEN
			SELECT coalesce(array_agg(c.partition), '{}'), coalesce(array_agg(st.version - c.last_pos), '{}')
			INTO v_parts, v_behind
			FROM projhost.checkpoints c JOIN projhost.streams st ON st.stream_id = c.partition
			WHERE c.projection = p_projection AND c.status <> 'running' AND c.status <> 'done'
				AND st.version > c.last_pos;
		END IF;
		v_left := v_events - (SELECT coalesce(sum(b), 0) FROM unnest(v_behind) b);
		-- 2.
		WHILE v_left > 0 AND v_chunk > 0 LOOP
			EXECUTE format($q$WITH w AS MATERIALIZED (
					SELECT e.stream_id, e.stream_version, e.transaction_id, e.global_position
					FROM projhost.events e
					WHERE %s AND (e.transaction_id, e.global_position) < ($2, $3)
					ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT $4),
				b AS MATERIALIZED (
					SELECT w.stream_id, w.stream_version, c.last_pos FROM w
					LEFT JOIN projhost.checkpoints c ON c.projection = $1 AND c.partition = w.stream_id
					WHERE w.stream_version > coalesce(c.last_pos, 0)
						AND (c.status IS NULL OR c.status = 'running' OR NOT $5 AND c.status <> 'done'))
				SELECT (SELECT count(*) FROM w), l.transaction_id, l.global_position, x.parts, x.behind
				FROM (SELECT array_agg(b.stream_id) AS parts,
						array_agg(st.version - coalesce(b.last_pos, 0)) AS behind
					FROM b JOIN projhost.streams st ON st.stream_id = b.stream_id AND st.version = b.stream_version) x
				LEFT JOIN (SELECT w.transaction_id, w.global_position FROM w
					ORDER BY w.transaction_id, w.global_position LIMIT 1) l ON true$q$, f.range_sql)
				INTO v_n, v_tx, v_pos, v_p, v_b USING p_projection, v_tx, v_pos, v_chunk, v_few;
			v_parts := v_parts || coalesce(v_p, '{}');
			v_behind := v_behind || coalesce(v_b, '{}');
			v_left := v_left - (SELECT coalesce(sum(b), 0) FROM unnest(v_b) b);
			v_seen := v_seen + v_n;
			v_found := v_found + coalesce(cardinality(v_p), 0);
			-- no more events (and they do not account for E: a streams row
			-- past its events, written by hand)
			EXIT WHEN v_n < v_chunk;
			v_chunk := least(v_chunk * 4, @WINDOW@ - v_seen);
			-- 3. the walk to the limit reads about limit / the share of
			-- streams behind among those of the events seen
			v_budget := p_limit::double precision * v_seen / greatest(v_found, 1);
			EXIT WHEN v_left > 0 AND v_budget <= v_chunk;
		END LOOP;
		IF v_left = 0 THEN
			RETURN QUERY SELECT u.p, coalesce(c.last_pos, 0), c.updated_at, c.status, c.error, u.b
				FROM unnest(v_parts, v_behind) u(p, b)
				LEFT JOIN projhost.checkpoints c ON c.projection = p_projection AND c.partition = u.p
				ORDER BY u.p LIMIT p_limit;
			RETURN;
		END IF;
		IF v_left > 0 AND v_budget <= v_chunk THEN
			-- 3. a page of @PAGE@ streams at a time, what it finds returned at
			-- once (in key order: the start of the answer); four times the
			-- streams expected at most, then step 4 for the rest
			v_page := format($q$WITH k AS MATERIALIZED (SELECT st.stream_id, st.version FROM projhost.streams st
					WHERE %s AND st.stream_id > $2 ORDER BY st.stream_id LIMIT $3)
				SELECT * FROM (SELECT k.stream_id AS p, coalesce(c.last_pos, 0) AS v, c.updated_at AS t,
						c.status AS s, c.error AS e, k.version - coalesce(c.last_pos, 0) AS b
					FROM k LEFT JOIN projhost.checkpoints c ON c.projection = $1 AND c.partition = k.stream_id
					WHERE k.version > coalesce(c.last_pos, 0) AND c.status IS DISTINCT FROM 'done'
					ORDER BY k.stream_id LIMIT $4) x
				UNION ALL SELECT max(k.stream_id), count(*), NULL, NULL, NULL, NULL FROM k$q$, f.range_sql);
			v_budget := least(greatest(4 * v_budget, @PAGE@ * 4), @WINDOW@);
			LOOP
				FOR r IN EXECUTE v_page USING p_projection, v_after, @PAGE@, v_rows LOOP
					IF r.b IS NULL THEN
						v_last := r.p;
						v_n := r.v;
					ELSE
						partition := r.p;
						version := r.v;
						processed_at := r.t;
						status := r.s;
						error := r.e;
						behind := r.b;
						RETURN NEXT;
						v_rows := v_rows - 1;
					END IF;
				END LOOP;
				v_walked := v_walked + v_n;
				IF v_rows = 0 OR v_n < @PAGE@ THEN RETURN; END IF;
				v_after := v_last;
				EXIT WHEN v_walked >= v_budget;
			END LOOP;
		END IF;
	END IF;
	-- 4. (after step 3's pages: the streams after them)
	PERFORM set_config('enable_seqscan', 'on', true), set_config('enable_hashjoin', 'on', true),
		set_config('enable_nestloop', 'off', true);
	RETURN QUERY EXECUTE v_walk USING p_projection, v_rows, v_after;
END
$fn$]]):gsub("@[A-Z]+@", { ["@FEW@"] = tostring(M.BEHIND_FEW), ["@WINDOW@"] = tostring(M.BEHIND_WINDOW),
	["@CHUNK@"] = "1000", ["@PAGE@"] = "5000" })

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
	-- issue 13: lag, progress and read-your-writes (see "Lag, progress ...")
	{
		-- a projection's source, as the worker that sets it up knows it
		-- (NAME or NAME@V: a checkpoint name)
		[[CREATE TABLE projhost.sources (
			projection text PRIMARY KEY,
			name text NOT NULL,
			kind text NOT NULL CHECK (kind IN ('all', 'category', 'stream')),
			value text NOT NULL DEFAULT '',
			types text[],
			partitioned boolean NOT NULL,
			own_events boolean NOT NULL DEFAULT false,
			version int NOT NULL,
			shadow_of text,
			-- events applied since this version began (a rebuild's progress)
			applied bigint NOT NULL DEFAULT 0,
			progress_at timestamptz,
			stalled_since timestamptz,
			updated_at timestamptz NOT NULL DEFAULT now()
		)]],
		-- applied counts of the workers, a row per worker every few seconds
		[[CREATE TABLE projhost.samples (
			projection text NOT NULL,
			since timestamptz NOT NULL,
			at timestamptz NOT NULL DEFAULT now(),
			n bigint NOT NULL CHECK (n >= 0)
		)]],
		[[CREATE INDEX ON projhost.samples (projection, at)]],
		-- lag_rows' totals of one projection's checkpoint rows
		[[CREATE TYPE projhost.checkpoint_totals AS (name text, n bigint, parts bigint, version int, pos bigint,
			done bigint, moved timestamptz)]],
		-- when stall_news last looked (one row)
		[[CREATE TABLE projhost.stall_check (at timestamptz NOT NULL)]],
		[[INSERT INTO projhost.stall_check VALUES ('-infinity')]],
		-- events an on_error "skip" moved past (wait_for says so)
		[[CREATE TABLE projhost.skipped (
			projection text NOT NULL,
			partition text NOT NULL DEFAULT '',
			global_position bigint NOT NULL,
			stream_id text,
			stream_version bigint,
			error text,
			skipped_at timestamptz NOT NULL DEFAULT now(),
			PRIMARY KEY (projection, global_position)
		)]],
		SOURCE_FILTER,
		SOURCE_READS,
		UNPARTITIONED_BEHIND,
		PARTITIONED_OLDEST,
		PARTITIONED_BEHIND,
		LAG_ROWS,
		PROJECTION_STATUS,
		HORIZON,
		STATUS_JSON,
		APPLIED,
		WAIT_FOR,
		WAIT_ALL,
		PARTITION_STATUS,
		NOTE_APPLIED,
		STALL_NEWS,
	},
	-- issue 14: finished partitions (ctx:done: 'done') and partitions held
	-- behind a dead letter (on_error "hold": 'held', its parked row marked
	-- hold). The CHECK is replaced in one ALTER, NOT VALID and not
	-- validated here: every row obeys the old CHECK, whose statuses are a
	-- subset of the new one's, so a validating scan could find nothing -
	-- and inside the migration's transaction it would read the whole table
	-- under the ACCESS EXCLUSIVE lock the ALTER took (held to COMMIT),
	-- stopping every batch meanwhile (1,000,000 partitions: a full scan).
	-- New rows are checked either way. Neither statement rewrites the
	-- table (ADD COLUMN with a constant default is a catalog change).
	{
		[[ALTER TABLE projhost.checkpoints DROP CONSTRAINT checkpoints_status_check,
			ADD CONSTRAINT checkpoints_status_check
			CHECK (status IN ('running', 'paused', 'failed', 'stopped', 'done', 'held')) NOT VALID]],
		-- a held event: its partition waits behind it (`parked retry` applies
		-- it and the rest in order, `parked skip` drops it and releases them)
		[[ALTER TABLE projhost.parked ADD COLUMN hold boolean NOT NULL DEFAULT false]],
		-- a done partition's events after its checkpoint are not behind
		-- (they are never applied): counted as done, so they neither show
		-- in events_behind nor make the projection stalled. The step 5
		-- body is kept under another name and does the rest; the done
		-- rows are few and in checkpoints_status_idx.
		[[ALTER FUNCTION projhost.partitioned_behind(text, bigint) RENAME TO partitioned_behind_v5]],
		[[CREATE FUNCTION projhost.partitioned_behind(p_projection text, p_done bigint,
			OUT events bigint, OUT estimated boolean, OUT oldest timestamptz)
		LANGUAGE sql STABLE AS $fn$
			SELECT b.events, b.estimated, b.oldest FROM projhost.partitioned_behind_v5(p_projection,
				p_done + coalesce((SELECT sum(greatest(st.version - c.last_pos, 0))
					FROM projhost.checkpoints c JOIN projhost.streams st ON st.stream_id = c.partition
					WHERE c.projection = p_projection AND c.status = 'done'), 0)::bigint) b
		$fn$]],
	},
	-- issue 13: the partitions behind without a join of every partition
	-- with its stream (see "The partitions behind")
	{
		[[ALTER FUNCTION projhost.lag_rows(text, double precision) RENAME TO lag_rows_v5]],
		NOTED_BEHIND,
		NOTE_BEHIND,
		LAG_ROWS_NOTED,
		PARTITIONS_BEHIND,
	},
	-- issue 14: durable timers (ctx:schedule, every = SECONDS; see
	-- worker/timers.lua). One row per pending timer of a checkpoint name
	-- (NAME, or NAME@V in a shadow rebuild) and partition; a keyed one is
	-- unique per (projection, partition, key) - NULL keys never conflict -
	-- and key '' is the every = SECONDS tick's. Due timers are an index
	-- range of (projection, due), never a scan.
	{
		[[CREATE TABLE projhost.timers (
			id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
			projection text NOT NULL,
			partition text NOT NULL DEFAULT '',
			key text,
			due timestamptz NOT NULL,
			timer_type text NOT NULL,
			data jsonb,
			created_at timestamptz NOT NULL DEFAULT now(),
			UNIQUE (projection, partition, key)
		)]],
		[[CREATE INDEX timers_due_idx ON projhost.timers (projection, due)]],
		-- a batch deletes the timers it fires; one that is gone was fired
		-- by someone else (never so while the batch holds its partitions'
		-- checkpoint locks): 40001, the batch rolls back and runs again
		[[CREATE FUNCTION projhost.fire_timers(p_ids bigint[]) RETURNS void
		LANGUAGE plpgsql AS $fn$
		DECLARE
			n bigint;
		BEGIN
			DELETE FROM projhost.timers WHERE id = ANY(p_ids);
			GET DIAGNOSTICS n = ROW_COUNT;
			IF n <> cardinality(p_ids) THEN
				RAISE EXCEPTION 'projhost.fire_timers: % of % timers are gone (fired by another batch)',
					cardinality(p_ids) - n, cardinality(p_ids) USING ERRCODE = '40001';
			END IF;
		END
		$fn$]],
	},
	-- issue 11: the wake trigger's functions without executor runs (see
	-- WAKE_NOTE; stores made before this step had their first bodies)
	{
		WAKE_NOTE,
		WAKE_AT_COMMIT,
	},
	-- issue 11: the writers note, the triggers only fire (see "Step 10:")
	{
		[[GRANT USAGE ON SEQUENCE projhost.wake_epoch, projhost.wake_skips TO PUBLIC]],
		WAKE_AT_COMMIT_V10,
		APPEND_V10,
		APPEND_ROWS_V10,
		[[DROP TRIGGER wake ON projhost.streams]],
		[[CREATE CONSTRAINT TRIGGER wake AFTER UPDATE OF last_position ON projhost.streams
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION projhost.wake_at_commit()]],
		-- not append's placeholder row (position 0) for a new stream
		[[CREATE CONSTRAINT TRIGGER wake_insert AFTER INSERT ON projhost.streams
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.last_position > 0)
			EXECUTE FUNCTION projhost.wake_at_commit()]],
		[[DROP FUNCTION projhost.wake_note(text, bigint)]],
	},
	-- issue 11: the events behind a category, and those before an event
	-- wait_for asks about, looked for in its own range (see "Step 11:")
	{
		EVENTS_RANGE,
		UNPARTITIONED_BEHIND_V11,
		APPLIED_V11,
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
	-- parked events of a projection: counted by status, looked up by wait_for
	-- the checkpoints that hold an error (status): a batch sets error to
	-- NULL when it already is, which keeps its update HOT
	-- a category's streams in key order, in any collation (discovery's
	-- walk, see reads.walk_sql; the partitions behind): the expression
	-- depends on stream_id alone, so append's updates of a stream's row
	-- stay HOT
	{ name = "streams_category_idx", on = "projhost.streams",
		columns = "(split_part(stream_id, '-', 1), stream_id)" },
	{ name = "checkpoints_error_idx", on = "projhost.checkpoints",
		columns = "(projection) WHERE error IS NOT NULL" },
	-- the checkpoints not running (status NAME --failed): a status changes
	-- seldom, so their updates stay HOT
	{ name = "checkpoints_status_idx", on = "projhost.checkpoints",
		columns = "(projection, partition) WHERE status <> 'running'" },
	{ name = "parked_position_idx", on = "projhost.parked", columns = "(projection, global_position)" },
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
