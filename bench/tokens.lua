-- wrk script: send "Authorization: Bearer <token>" with tokens taken round-robin from a file.
-- Usage: wrk -t1 -c32 -d10s --latency -s bench/tokens.lua URL -- TOKENS_FILE [OFFSET]
-- With one thread the order is exact: request k (from 0) carries token (OFFSET + k) mod N.

local tokens = {}
local count = 0
local index = 0
local path = "/"

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      count = count + 1
      tokens[count] = "Bearer " .. line
    end
  end
  if count == 0 then
    error("no tokens in " .. args[1])
  end
  index = tonumber(args[2] or "0")
  path = wrk.path
end

function request()
  local token = tokens[(index % count) + 1]
  index = index + 1
  return wrk.format("GET", path, { ["Authorization"] = token })
end
