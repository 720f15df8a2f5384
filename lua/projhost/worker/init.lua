-- The worker process: one PostgreSQL connection and one LuaJIT state holding
-- every loaded projection. The master (core/master.c) sends it jobs over a
-- pipe; each job is one batch in one transaction:
--
--   BEGIN; lock the checkpoint row (FOR UPDATE SKIP LOCKED); load state and
--   checkpoint; read events in gap-free order; run the handlers (their SQL
--   and emits go through the same connection); store state + checkpoint;
--   COMMIT.
--
-- So effects, emitted events, state and checkpoint commit together or not
-- at all, and a crash anywhere (SIGKILL included) rolls the batch back.
--
-- The package, one job a file (state.lua holds what they share):
--   protocol   the worker's side of the master's messages; its loop
--   lifecycle  (re)load, setup, reset, shadow rebuilds, caught-up lines
--   page       the unpartitioned plan (a page a batch, read ahead)
--   parts      the partitioned plan (many partitions a batch; ANALYZE rule)
--   discovery  which partitions are behind (walks, windows, tokens)
--   transact   the batch transaction every plan runs (the hot loop)
--   failure    overruns, on_error, settle and the error actions
--   parked     `projhost parked retry`
--   ctx        the ctx backend: pipeline tags, emit, log
--   events     read SQL, source filters, the lazy event
--   session    connection, session settings, our own statements, backoff
--   state      the worker's runtime state, shared and per definition
--
-- A fresh require of projhost.worker is a fresh worker, as when it was one
-- file (spec/integration/run_spec.lua drives one in its own process with
-- its own PROJHOST_BATCH_SIZE): its files are loaded again with it.
for name in pairs(package.loaded) do
	if name:sub(1, 16) == "projhost.worker." then package.loaded[name] = nil end
end

return require "projhost.worker.protocol"
