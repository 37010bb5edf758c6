local function epochs()
  local current = redis.call('HMGET', KEYS[1], 'user', 'product', 'list')
  for i = 1, 3 do current[i] = tonumber(current[i] or '0') end
  return {0, current[1], current[2], current[3]}
end
if ARGV[2] ~= '' and redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return epochs() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'bumped_at_ms') or '0')
local spacing = tonumber(ARGV[1])
if now - last < spacing then return {math.max(1, spacing - (now - last))} end
redis.call('HSET', KEYS[1], 'bumped_at_ms', now)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], now) end
for i = 3, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  redis.call('HSET', KEYS[1], ARGV[i], math.max(current, tonumber(ARGV[i + 1])) + 1)
end
return epochs()
