-- Read model, one statement per event: the running balance of every
-- account in the state (stream -> amount) and one upsert per event.
local UPSERT = [[INSERT INTO balances (id, amount) VALUES ($1, $2)
	ON CONFLICT (id) DO UPDATE SET amount = $2]]

return {
	name = "bench_balances_exec",
	from = { category = "account" },
	setup = [[CREATE TABLE IF NOT EXISTS balances (id text PRIMARY KEY, amount bigint)]],
	init = function() return {} end,
	-- a failure is a bug in the benchmark: stop at once, no retries
	on_error = function() return "stop" end,
	when = {
		Deposited = function(s, e, ctx)
			local a = (s[e.stream] or 0) + e.data.amount
			s[e.stream] = a
			ctx:exec(UPSERT, e.stream, a)
		end,
		Withdrawn = function(s, e, ctx)
			local a = (s[e.stream] or 0) - e.data.amount
			s[e.stream] = a
			ctx:exec(UPSERT, e.stream, a)
		end,
	},
}
