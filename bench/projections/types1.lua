-- Row 8: a types filter matching 1% of the store (its category is 45% of
-- it), one upsert per event: stream -> sum of amounts in the state and in
-- types1.
return {
	name = "bench_types1",
	from = { category = "deep", types = { "Rare" } },
	setup = [[CREATE TABLE IF NOT EXISTS types1 (id text PRIMARY KEY, amount bigint)]],
	init = function() return {} end,
	-- a failure is a bug in the benchmark: stop at once, no retries
	on_error = function() return "stop" end,
	when = {
		Rare = function(s, e, ctx)
			s[e.stream] = (s[e.stream] or 0) + e.data.amount
			ctx:upsert("types1", "id", { id = e.stream, amount = s[e.stream] })
		end,
	},
}
