local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'exp', 'cid', 'user', 'info')
if not s[1] or s[1] == 'dead' then return {'unknown'} end
local live = false
if s[1] == 'live' then
  local hb = tonumber(redis.call('ZSCORE', KEYS[3], s[2]) or 0)
  live = hb + tonumber(ARGV[2]) > tonumber(ARGV[1])
end
local ends = ARGV[3] == '1' and s[1] ~= 'issued'
local result = {live and 'live' or 'offline', s[2] or '', (ends and not live) and '1' or '0',
  s[4] or '', s[5] or '', s[6] or ''}
if ends then
  for _, c in ipairs(redis.call('SMEMBERS', KEYS[2])) do table.insert(result, c) end
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'dead')
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[4], ARGV[4])
  local exp = tonumber(s[3]) or 0
  redis.call('PEXPIRE', KEYS[1], math.max(exp - tonumber(ARGV[1]), 0) + 1000)
  if ends and s[4] and s[4] ~= '' then
    tell(KEYS[5], s[4], ARGV[4], '$disconnect',
      ended('disconnected by the application', s[5], ARGV[5], ARGV[6]))
  end
end
return result
