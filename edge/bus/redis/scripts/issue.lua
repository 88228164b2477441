redis.call('HSET', KEYS[1], 'state', 'issued', 'exp', ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'user', ARGV[2], 'info', ARGV[3])
end
redis.call('PEXPIREAT', KEYS[1], tonumber(ARGV[1]) + 1000)
return 1
