-- projhost.schema: the SQL contract (design §2), created and migrated
-- idempotently by every host and CLI command that touches the database.
--
-- schema.migrate(conn) -> true | nil, msg, sqlstate
--
-- Migrations are numbered steps; each is a list of single statements
-- because conn:exec uses the extended protocol, which takes one statement
-- at a time. A step is never edited once released: change the schema by
-- appending a step.
--
-- Errors raised by the SQL functions (clients may rely on these):
--   22023 invalid_parameter_value  a malformed argument; the message names
--                                  the element by its 0-based array index
--   P0001 raise_exception          "wrong expected version for stream 'S':
--                                  expected E, actual A"
--   23505 unique_violation         an event "id" that already exists
local M = {}

-- Fixed key for pg_advisory_xact_lock: two hosts starting at once take
-- turns instead of racing on CREATE ... IF NOT EXISTS (which is not safe
-- under concurrency). 0x70726f6a686f7374 is "projhost" in ASCII.
M.LOCK_KEY = "8102654201364165492"

-- Shared element checks of append and append_many, set-based so a 5,000
-- event chunk costs one scan. Returns the first problem as "event at index
-- I: ..." or NULL. JSON null for data/metadata counts as absent.
local CHECK_EVENTS = [[
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

local APPEND = [[
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
		CHECK_EVENTS,
		APPEND,
		APPEND_MANY,
	},
}

M.latest = #M.steps

local function rollback(conn, msg, code)
	conn:exec("ROLLBACK")
	return nil, msg, code
end

-- Apply the steps above the recorded version, all in one transaction.
function M.migrate(conn)
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
	return true
end

return M
