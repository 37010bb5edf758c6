if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local first, last = 3, #ARGV
local base = tonumber(ARGV[2])
for chunk = first, last, 500 do
  local args = {}
  for i = chunk, math.min(chunk + 499, last) do
    args[#args + 1] = base + i - first
    args[#args + 1] = ARGV[i]
  end
  redis.call('ZADD', KEYS[1], unpack(args))
end
if redis.call('PTTL', KEYS[1]) < 0 then
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) else redis.call('DEL', KEYS[1]) end
end
return 1
