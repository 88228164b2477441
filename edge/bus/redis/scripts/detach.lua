local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'exp', 'cid')
if s[1] ~= 'live' or s[2] ~= ARGV[1] then return {} end
redis.call('SREM', KEYS[4], ARGV[5])
local now = tonumber(ARGV[2]); local grace = tonumber(ARGV[4]); local exp = tonumber(s[3]) or now
if ARGV[3] == '1' and grace > 0 then
  redis.call('HSET', KEYS[1], 'state', 'grace', 'until', now + grace)
  redis.call('ZADD', KEYS[3], now + grace, ARGV[5])
  -- Kept a minute past the grace, so a late reaper still finds whom to tell.
  local ttl = math.max(now + grace, exp) - now + 60000
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  local gone = redis.call('SMEMBERS', KEYS[2])
  local user = redis.call('HGET', KEYS[1], 'user') or ''
  table.insert(gone, 1, user)
  redis.call('HSET', KEYS[1], 'state', 'dead')
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], math.max(exp - now, 0) + 1000)
  if s[4] and s[4] ~= '' then
    tell(KEYS[5], s[4], ARGV[5], '$disconnect', ended(ARGV[6], user, ARGV[7], ARGV[8]))
  end
  return gone
end
return {}
