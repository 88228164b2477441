local s = redis.call('HMGET', KEYS[1], 'state', 'until', 'node', 'cid', 'user', 'exp')
local now = tonumber(ARGV[1])
local due
if ARGV[3] == 'grace' then
  if s[1] == 'grace' and tonumber(s[2]) > now then return {} end
  redis.call('ZREM', KEYS[3], ARGV[2])
  due = s[1] == 'grace'
else
  redis.call('SREM', KEYS[3], ARGV[2])
  due = s[1] == 'live' and s[3] == ARGV[4]
end
if not due then return {} end
local result = redis.call('SMEMBERS', KEYS[2])
table.insert(result, 1, s[5] or '')
table.insert(result, 1, s[4] or '')
redis.call('HSET', KEYS[1], 'state', 'dead')
redis.call('DEL', KEYS[2])
redis.call('PEXPIRE', KEYS[1], math.max((tonumber(s[6]) or 0) - now, 0) + 1000)
if s[4] and s[4] ~= '' then
  local reason = ARGV[3] == 'grace' and 'grace expired' or 'node lost'
  tell(KEYS[4], s[4], ARGV[2], '$disconnect', ended(reason, s[5]))
end
return result
