-- ARGV[1]: {"accounts": [[id, version, balance, {key id: "YYYY-MM spend"}], ...],
--           "released": [request id, ...], "status": "settled" | "released"}. Copies each
-- balance unless a newer one is there, and releases the holds of the requests, in one atomic
-- step.
local doc = cjson.decode(ARGV[1])
for _, account in ipairs(doc.accounts) do
  local name = 'billing:acct:' .. account[1]
  local version = redis.call('HGET', name, 'version')
  if not version or tonumber(version) <= tonumber(account[2]) then
    redis.call('HSET', name, 'version', account[2], 'balance', account[3])
    for kid, spend in pairs(account[4]) do redis.call('HSET', name, 'spend:' .. kid, spend) end
  end
end
local released = 0
for _, rid in ipairs(doc.released) do released = released + release(rid, doc.status) end
return released
