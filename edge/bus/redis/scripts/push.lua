if ARGV[9] == '1' then
  local prior = redis.call('GET', KEYS[3])
  if prior then
    local sp = string.find(prior, ' ', 1, true)
    return {string.sub(prior, 1, sp - 1), tonumber(string.sub(prior, sp + 1)), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if tonumber(ARGV[3]) > 0 and tonumber(ARGV[4]) > 0 then
  -- Pushes past their time to live leave: every 16th push looks at the oldest 32, so the log
  -- keeps up at a fraction of a command per push.
  local cut = nil
  local oldest = {}
  if offset % 16 == 0 then oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 32) end
  for _, e in ipairs(oldest) do
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 't' and tonumber(f[i + 1]) + tonumber(ARGV[4]) <= tonumber(ARGV[7]) then
        cut = tonumber(string.sub(e[1], 3))
      end
    end
  end
  if cut then redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. (cut + 1)) end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '0-' .. offset, 't', ARGV[7], 'p', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call(PUB, ARGV[6], epoch .. ' ' .. offset .. '\n' .. ARGV[2])
if ARGV[9] == '1' then
  redis.call('SET', KEYS[3], epoch .. ' ' .. offset, 'PX', ARGV[8])
end
return {epoch, offset, 0}
