-- Live latency: one row per event, so every event's read-model commit can
-- be matched with its own append (pg_xact_commit_timestamp of both xmins).
return {
	name = "bench_latency",
	from = { category = "lat" },
	setup = [[CREATE TABLE IF NOT EXISTS latency (position bigint PRIMARY KEY)]],
	-- a failure is a bug in the benchmark: stop at once, no retries
	on_error = function() return "stop" end,
	when = {
		["*"] = function(_, e, ctx)
			ctx:exec("INSERT INTO latency (position) VALUES ($1)", e.position)
		end,
	},
}
