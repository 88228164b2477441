local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'cid', 'user', 'info')
if not s[1] or s[1] == 'dead' then return {'unknown'} end
local changed = {}
for i = 4, #ARGV do
  local n
  if ARGV[3] == '1' then n = redis.call('SADD', KEYS[2], ARGV[i]) else n = redis.call('SREM', KEYS[2], ARGV[i]) end
  if n == 1 then table.insert(changed, ARGV[i]) end
end
if ARGV[3] == '1' then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
local kind = 'offline'
if s[1] == 'live' then
  local hb = tonumber(redis.call('ZSCORE', KEYS[3], s[2]) or 0)
  if hb + tonumber(ARGV[2]) > tonumber(ARGV[1]) then kind = 'live' end
end
local connected = (s[1] == 'live' or s[1] == 'grace') and '1' or '0'
local result = {kind, s[2] or '', connected, s[3] or '', s[4] or '', s[5] or ''}
for _, c in ipairs(changed) do table.insert(result, c) end
return result
