-- Raises an alert event for every large withdrawal.  Emitted events are
-- appended in the same transaction as the checkpoint, so an alert is
-- emitted exactly once even if the batch is retried.
local LARGE = 100

return {
	name = "notifier",
	from = { category = "account", types = { "Withdrawn" } },

	init = function() return { alerts = 0 } end,

	when = {
		Withdrawn = function(s, e, ctx)
			local amount = e.data.amount
			if amount < LARGE then return end
			-- "account-42" -> "alerts-42"
			local id = e.stream:match("^[^-]*-(.*)$") or e.stream
			ctx:emit("alerts-" .. id, "LargeWithdrawal", {
				account = e.stream,
				amount = amount,
				position = e.position,
			})
			s.alerts = s.alerts + 1
		end,
	},
}
