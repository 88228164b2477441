if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'live', 'node', ARGV[1], 'exp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'user', ARGV[4], 'info', ARGV[5])
end
if #ARGV > 6 then
  redis.call('SADD', KEYS[2], unpack(ARGV, 7))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
