local M = {}
function M.main(arg) print("projhost: cli not written yet") return 2 end
return M
