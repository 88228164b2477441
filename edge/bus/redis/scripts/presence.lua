local topic, delay, channel = ARGV[5], tonumber(ARGV[6]), ARGV[8]
if ARGV[1] == 'join' then
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[5], ARGV[2], ARGV[9]) end
  if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 0 then return '' end
  local first = 1
  if ARGV[4] ~= '' and redis.call('HINCRBY', KEYS[2], ARGV[4], 1) > 1 then first = 0 end
  local told = ''
  if delay >= 0 and redis.call('HLEN', KEYS[1]) == 1
      and redis.call('ZREM', KEYS[3], channel) == 0 then
    redis.call(PUB, topic, '!occupied')
    tell(KEYS[4], '', '', '$occupied', cjson.encode({channel = channel}))
    told = 'occupied'
  end
  redis.call(PUB, topic, '!join ' .. first .. ' ' .. ARGV[2] .. '\n' .. ARGV[3])
  return told
end
if ARGV[9] ~= '' and redis.call('HGET', KEYS[5], ARGV[2]) ~= ARGV[9] then return '' end
local entry = redis.call('HGET', KEYS[1], ARGV[2])
if not entry then return '' end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
local last = 1
if ARGV[4] ~= '' then
  if redis.call('HINCRBY', KEYS[2], ARGV[4], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[4])
  else
    last = 0
  end
end
redis.call(PUB, topic, '!leave ' .. last .. ' ' .. ARGV[2] .. '\n' .. entry)
if delay < 0 or redis.call('HLEN', KEYS[1]) > 0 then return '' end
if delay == 0 then
  redis.call(PUB, topic, '!vacated')
  tell(KEYS[4], '', '', '$vacated', cjson.encode({channel = channel}))
  return 'vacated'
end
redis.call('ZADD', KEYS[3], tonumber(ARGV[7]) + delay, channel)
return ''
