-- Shared by every script of billing.enforcement.hotpath: KEYS[1] is the hash of open holds
-- (request id -> 'account key amount hold_id'), KEYS[2] the sorted set of their expiries.
local function release(rid)
  local hold = redis.call('HGET', KEYS[1], rid)
  if hold then
    local account, key, amount = string.match(hold, '^(%S+) (%S+) (%S+)')
    local name = 'billing:acct:' .. account
    redis.call('HINCRBY', name, 'held', -tonumber(amount))
    redis.call('HINCRBY', name, 'kheld:' .. key, -tonumber(amount))
    redis.call('HDEL', KEYS[1], rid)
  end
  redis.call('ZREM', KEYS[2], rid)
  return hold and 1 or 0
end
local function purge(now, limit)
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
  for _, rid in ipairs(due) do release(rid) end
  return #due
end
