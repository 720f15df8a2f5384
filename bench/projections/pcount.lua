-- Partitioned, state only: one state (an event count) per stream.
return {
	name = "bench_pcount",
	from = { category = "account" },
	partition = "stream",
	init = function() return { n = 0 } end,
	-- a failure is a bug in the benchmark: stop at once, no retries
	on_error = function() return "stop" end,
	when = {
		["*"] = function(s)
			s.n = s.n + 1
		end,
	},
}
