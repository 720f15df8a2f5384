-- Read model, set-based: ctx:upsert coalesces the writes to one key within
-- a batch and flushes them as one statement at the end of the batch.
local B = {}
return {
	name = "bench_nostate",
	from = { category = "account" },
	setup = [[CREATE TABLE IF NOT EXISTS balances (id text PRIMARY KEY, amount bigint)]],
	init = function() return {} end,
	-- a failure is a bug in the benchmark: stop at once, no retries
	on_error = function() return "stop" end,
	when = {
		Deposited = function(s, e, ctx)
			B[e.stream] = (B[e.stream] or 0) + e.data.amount
			ctx:upsert("balances", "id", { id = e.stream, amount = B[e.stream] })
		end,
		Withdrawn = function(s, e, ctx)
			B[e.stream] = (B[e.stream] or 0) - e.data.amount
			ctx:upsert("balances", "id", { id = e.stream, amount = B[e.stream] })
		end,
	},
}
