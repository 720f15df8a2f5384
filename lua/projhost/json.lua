-- projhost.json: the one JSON configuration of projhost - what a projection
-- sees or sends (table parameters, emitted data, state, events and the
-- scripts' `json` global), what the worker stores and what the CLI reads
-- and prints: 14 significant digits (integers up to 1e14 stay exact) and
-- sparse arrays encoded as objects instead of raising. A private cjson
-- instance, so nobody else's cjson settings change.
local cjson = require "cjson"

local json = cjson.new()
json.encode_number_precision(14)
json.encode_sparse_array(true)

return json
