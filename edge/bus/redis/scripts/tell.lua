local function tell(outbox, cid, digest, action, json)
  redis.call('XADD', outbox, 'MAXLEN', '~', 100000, '*',
    'cid', cid, 'digest', digest, 'action', action, 'json', json)
  redis.call(PUB, outbox, '')
end
local function ended(reason, user, code, close_reason)
  local e = {reason = reason, final = true}
  if user and user ~= '' then e.user = user else e.user = cjson.null end
  if code and code ~= '' then
    e.code = tonumber(code)
    e.close_reason = close_reason
  end
  return cjson.encode(e)
end
