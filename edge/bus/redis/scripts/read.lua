local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local result = {epoch, tonumber(redis.call('HGET', KEYS[1], 'o'))}
local entries = {}
local count = tonumber(ARGV[5])
if ARGV[3] == 'after' and count > 0 then
  entries = redis.call('XRANGE', KEYS[2], '(0-' .. ARGV[4], '+', 'COUNT', count)
elseif ARGV[3] == 'before' and count > 0 then
  local from = '+'
  if tonumber(ARGV[4]) > 0 then from = '(0-' .. ARGV[4] end
  entries = redis.call('XREVRANGE', KEYS[2], from, '-', 'COUNT', count)
end
for _, e in ipairs(entries) do
  local id = e[1]
  local fields = e[2]
  local t, p = '0', 'null'
  for i = 1, #fields, 2 do
    if fields[i] == 't' then t = fields[i + 1] elseif fields[i] == 'p' then p = fields[i + 1] end
  end
  table.insert(result, tonumber(string.sub(id, 3)))
  table.insert(result, tonumber(t))
  table.insert(result, p)
end
return result
