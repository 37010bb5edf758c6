-- Moves each kind named to a new epoch, one above both its current epoch and
-- the floor given for it (the highest the caller has seen: a failover may
-- have lost the latest bumps), unless the last bump is less than the spacing
-- old (measured with the Redis server's clock, the one every instance
-- shares), or the reason, when one is given, was acted on already (every
-- instance notices the same failover). The reason 'server' stands for this
-- server's identity (its run id and replication id): a server that has not
-- recorded its own identity holds keys written before it became the primary
-- (a promoted replica) or none at all (restarted empty). A namespace that has
-- no epochs yet, and no floor above 0, holds nothing to retire: the identity
-- is recorded without a bump.
-- KEYS: the epochs hash. ARGV: spacing ms, reason ('' for none), the WAL
-- position of the newest write the bump retires ('' for none; kept per kind
-- as '<kind>:lsn', only ever raised), then each kind and its floor.
-- Returns {0, user, product, list} when bumped (or the reason was acted on),
-- {ms to wait} when too soon.
local function epochs()
  local current = redis.call('HMGET', KEYS[1], 'user', 'product', 'list')
  for i = 1, 3 do current[i] = tonumber(current[i] or '0') end
  return {0, current[1], current[2], current[3]}
end
local reason = ARGV[2]
if reason == 'server' then
  local info = redis.call('INFO', 'server') .. redis.call('INFO', 'replication')
  reason = 'server:' .. string.match(info, 'run_id:(%w+)') .. ':' .. string.match(info, 'master_replid:(%w+)')
end
if reason ~= '' and redis.call('HEXISTS', KEYS[1], reason) == 1 then return epochs() end
if ARGV[2] == 'server' and redis.call('EXISTS', KEYS[1]) == 0 then
  local fresh = true
  for i = 5, #ARGV, 2 do
    if tonumber(ARGV[i]) > 0 then fresh = false end
  end
  if fresh then
    redis.call('HSET', KEYS[1], reason, 0)
    return epochs()
  end
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'bumped_at_ms') or '0')
local spacing = tonumber(ARGV[1])
if now - last < spacing then return {math.max(1, spacing - (now - last))} end
redis.call('HSET', KEYS[1], 'bumped_at_ms', now)
if reason ~= '' then redis.call('HSET', KEYS[1], reason, now) end
for i = 4, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  redis.call('HSET', KEYS[1], ARGV[i], math.max(current, tonumber(ARGV[i + 1])) + 1)
  if ARGV[3] ~= '' then
    local field = ARGV[i] .. ':lsn'
    local marked = redis.call('HGET', KEYS[1], field)
    if not marked or marked < ARGV[3] then redis.call('HSET', KEYS[1], field, ARGV[3]) end
  end
end
return epochs()
