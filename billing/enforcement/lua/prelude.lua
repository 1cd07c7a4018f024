-- Shared by every script of billing.enforcement.hotpath: KEYS[1] is the hash of open holds
-- (request id -> 'account key amount hold_id output_tokens request_hash'), KEYS[2] the sorted
-- set of their expiries. 'billing:hid:<hold id>' says what became of a hold ('<status>
-- <request id>', status open, released, settled or expired) until a while after its expiry.
local function release(rid, status)
  local hold = redis.call('HGET', KEYS[1], rid)
  if hold then
    local account, key, amount, hold_id = string.match(hold, '^(%S+) (%S+) (%S+) (%S+)')
    local name = 'billing:acct:' .. account
    -- 0 - x, not -x: a free hold's -0 would reach Redis as "-0", which is not an integer.
    redis.call('HINCRBY', name, 'held', 0 - tonumber(amount))
    redis.call('HINCRBY', name, 'kheld:' .. key, 0 - tonumber(amount))
    redis.call('HDEL', KEYS[1], rid)
    redis.call('SET', 'billing:hid:' .. hold_id, status .. ' ' .. rid, 'XX', 'KEEPTTL')
  end
  redis.call('ZREM', KEYS[2], rid)
  return hold and 1 or 0
end
local function purge(now, limit)
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
  for _, rid in ipairs(due) do release(rid, 'expired') end
  return #due
end
-- The limits library's moving window (its moving_window.lua): how many of the newest entries
-- of the list are younger than the window, and the oldest of those ('' when none), as text.
local function window(list, amount, expiry, now)
  local low, high, found = 0, amount - 1, nil
  while low <= high do
    local mid = math.floor((low + high) / 2)
    local at = tonumber(redis.call('LINDEX', list, mid))
    if at and at >= now - expiry then found = mid; low = mid + 1 else high = mid - 1 end
  end
  if not found then return '0', '' end
  return string.format('%d', found + 1), redis.call('LINDEX', list, found)
end
