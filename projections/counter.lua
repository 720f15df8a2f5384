-- Counts every event in the store, in total and per type.  No SQL: the
-- state itself (stored by the host as JSON) is the result.
return {
	name = "counter",
	from = { all = true },

	init = function() return { total = 0, by_type = {} } end,

	when = {
		["*"] = function(s, e)
			s.total = s.total + 1
			s.by_type[e.type] = (s.by_type[e.type] or 0) + 1
		end,
	},
}
