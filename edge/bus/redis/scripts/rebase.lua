local epoch = redis.call('HGET', KEYS[1], 'e')
if epoch and epoch ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[2], 'o', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
