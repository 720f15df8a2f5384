-- Row 8: a category that is 10% of the store, one upsert per event (as
-- balances_upsert.lua): stream -> balance in the state and in share10.
return {
	name = "bench_share10",
	from = { category = "ten" },
	setup = [[CREATE TABLE IF NOT EXISTS share10 (id text PRIMARY KEY, amount bigint)]],
	init = function() return {} end,
	-- a failure is a bug in the benchmark: stop at once, no retries
	on_error = function() return "stop" end,
	when = {
		Deposited = function(s, e, ctx)
			s[e.stream] = (s[e.stream] or 0) + e.data.amount
			ctx:upsert("share10", "id", { id = e.stream, amount = s[e.stream] })
		end,
		Withdrawn = function(s, e, ctx)
			s[e.stream] = (s[e.stream] or 0) - e.data.amount
			ctx:upsert("share10", "id", { id = e.stream, amount = s[e.stream] })
		end,
	},
}
