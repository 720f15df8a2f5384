-- Balance per account, kept in a table the application can query.
-- One state per stream (account-1, account-2, ...), so accounts are
-- processed independently.
return {
	name = "balances",
	version = 1,
	from = { category = "account", types = { "Deposited", "Withdrawn" } },
	partition = "stream",

	setup = [[
		CREATE TABLE IF NOT EXISTS balances (
			id text PRIMARY KEY,
			amount bigint NOT NULL,
			updated_at timestamptz NOT NULL DEFAULT now()
		)
	]],
	reset = [[TRUNCATE balances]],

	init = function() return { amount = 0 } end,

	when = {
		Deposited = function(s, e, ctx)
			s.amount = s.amount + e.data.amount
			ctx:exec([[INSERT INTO balances (id, amount) VALUES ($1, $2)
				ON CONFLICT (id) DO UPDATE SET amount = $2, updated_at = now()]],
				e.stream, s.amount)
		end,

		Withdrawn = function(s, e, ctx)
			s.amount = s.amount - e.data.amount
			ctx:exec([[INSERT INTO balances (id, amount) VALUES ($1, $2)
				ON CONFLICT (id) DO UPDATE SET amount = $2, updated_at = now()]],
				e.stream, s.amount)
		end,
	},
}
