if redis.call('GET', KEYS[4]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[3])
local first, last = 4, #ARGV
for chunk = first, last, 500 do
  local args = {}
  for i = chunk, math.min(chunk + 499, last) do
    args[#args + 1] = i - first
    args[#args + 1] = ARGV[i]
  end
  redis.call('ZADD', KEYS[1], unpack(args))
end
if last >= first then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('DEL', KEYS[4])
return 1
