-- Row 10: partitioned, state only (as pcount.lua) over category "wide" of
-- the store: 1,000,000 streams, ~1.3 events each.
return {
	name = "bench_pwide",
	from = { category = "wide" },
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
