local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not at or tonumber(at) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
redis.call(PUB, ARGV[3], '!vacated')
tell(KEYS[3], '', '', '$vacated', cjson.encode({channel = ARGV[1]}))
return 1
