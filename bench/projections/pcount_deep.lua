-- Row 10: partitioned, state only (as pcount.lua) over category "deep" of
-- the store: 100,000 streams, 13.5 events each.
return {
	name = "bench_pdeep",
	from = { category = "deep" },
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
