-- reads.pg_text_array: the text[] literal every list of partitions and
-- states goes to PostgreSQL as (checked here against the literal's rules
-- element by element; the integration specs send such lists for real).
local reads = require "projhost.reads"

-- The rules, one element at a time: every element quoted, \ and " escaped
-- with a backslash, false as NULL.
local function reference(list)
	local out = {}
	for i, s in ipairs(list) do
		out[i] = s == false and "NULL" or ('"' .. s:gsub('[\\"]', '\\%0') .. '"')
	end
	return "{" .. table.concat(out, ",") .. "}"
end

describe("reads.pg_text_array", function()
	it("writes the literal of plain names, JSON states, NULLs and the worst bytes", function()
		local cases = {
			{},
			{ "" },
			{ "a" },
			{ "wide-1", "wide-2", "wide-3" },
			{ '{"n":1}', '{"n":2,"s":"a\\"b"}' },
			{ "a\\", "\\", '"', '""', "\\\\\"" },
			{ "x\1y", "z" },
			{ "\1", "\1\1" },
			{ "tab\there", "nl\nhere", "nul\0here", "{,}" },
			{ false },
			{ "a", false, '"b"' },
		}
		for _, list in ipairs(cases) do
			assert.are.equal(reference(list), reads.pg_text_array(list))
		end
	end)

	it("agrees with the rules on random lists of any byte", function()
		math.randomseed(11)
		local alphabet = { "a", "-", "\\", '"', "\1", "\0", "\t", ",", "{", "}", " ", "\255" }
		for _ = 1, 500 do
			local list = {}
			for i = 1, math.random(0, 12) do
				if math.random() < 0.05 then
					list[i] = false
				else
					local b = {}
					for j = 1, math.random(0, 6) do b[j] = alphabet[math.random(#alphabet)] end
					list[i] = table.concat(b)
				end
			end
			assert.are.equal(reference(list), reads.pg_text_array(list))
		end
	end)

	it("refuses an element that is neither a string nor false (a programmer's error)", function()
		assert.has_error(function() reads.pg_text_array({ "a", 1 }) end,
			"core.text_array: element 2 is a number, not a string or false")
		assert.has_error(function() reads.pg_text_array({ true }) end)
	end)
end)
