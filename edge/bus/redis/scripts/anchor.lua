-- An event stream's anchor: its positions, kept with the credentials' state (and expiring
-- with it) in one of four fields, so a reconnect on any node finds the last few.
-- KEYS[1]: s. ARGV: number, positions (JSON). Returns 1, or 0 when the state is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local n = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'sse' .. (n % 4), ARGV[1] .. ' ' .. ARGV[2])
return 1
