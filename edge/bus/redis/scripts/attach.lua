local now = tonumber(ARGV[1]); local exp = tonumber(ARGV[3])
local grace = tonumber(ARGV[4]); local lease = tonumber(ARGV[5])
local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'until')
local state = s[1]
if state == 'dead' then return {'ended'} end
if state == 'live' then
  local hb = tonumber(redis.call('ZSCORE', KEYS[3], s[2]) or 0)
  if hb + lease > now then return {'in_use'} end
  if now >= hb + lease + grace then return {'ended'} end
elseif state == 'grace' then
  if now >= tonumber(s[3]) then return {'ended'} end
else
  if now >= exp then return {'expired'} end
  if not state then return {'unknown'} end
end
redis.call('HSET', KEYS[1], 'state', 'live', 'node', ARGV[2], 'exp', exp, 'cid', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZREM', KEYS[4], ARGV[8])
redis.call('SADD', KEYS[5], ARGV[8])
redis.call('PEXPIRE', KEYS[5], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local result = redis.call('SMEMBERS', KEYS[2])
local who = redis.call('HMGET', KEYS[1], 'user', 'info')
table.insert(result, 1, who[2] or '')
table.insert(result, 1, who[1] or '')
table.insert(result, 1, state == 'issued' and 'fresh' or 'resumed')
table.insert(result, 1, 'ok')
return result
