-- State only: counts every event in the store, per type. No SQL per event,
-- so a catch-up measures reading, decoding and running handlers.
return {
	name = "bench_count",
	from = { all = true },
	init = function() return { total = 0, by_type = {} } end,
	-- a failure is a bug in the benchmark: stop at once, no retries
	on_error = function() return "stop" end,
	when = {
		["*"] = function(s, e)
			s.total = s.total + 1
			s.by_type[e.type] = (s.by_type[e.type] or 0) + 1
		end,
	},
}
