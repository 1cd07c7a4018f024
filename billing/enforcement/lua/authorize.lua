-- ARGV: keyed hash, model id ('' when the model is unknown: check the key only), amount,
-- request id, hold id, now (ms), expiry (ms), month (YYYY-MM), now (seconds).
-- Answers {verdict, key id, account id, rate limit, available, hold id, amount}; the first
-- failing check decides the verdict. A key state's verdict is the state's name, checked in
-- the order of the state table (billing.accounts.key_states, tested row by row against this
-- script); 'invalid' is a secret that names no key.
local kid = redis.call('GET', 'billing:kh:' .. ARGV[1])
if kid == '-' then return {'invalid'} end
if not kid then return {'miss'} end
local key = redis.call('HMGET', 'billing:key:' .. kid,
  'state', 'account_id', 'key_hash', 'expires_ms', 'cap', 'models', 'rate_limit',
  'rate_key', 'rate_amount', 'rate_expiry')
local state = key[1]
-- A key copied before the copy held its limits (rate_key is always written) is copied again.
if not state or not key[8] then return {'miss'} end
if key[3] ~= ARGV[1] then return {'invalid'} end
local now = tonumber(ARGV[6])
local head = {kid, key[2], key[7]}
local function answer(verdict, available, hold_id, amount)
  return {verdict, head[1], head[2], head[3], available or '', hold_id or '', amount or ''}
end
if state == 'revoked' or state == 'disabled' then return answer(state) end
if state == 'expired' or (key[4] ~= '' and tonumber(key[4]) <= now) then
  return answer('expired')
end
if state == 'suspended' then return answer('suspended') end
local name = 'billing:acct:' .. key[2]
local account = redis.call('HMGET', name, 'balance', 'held', 'spend:' .. kid, 'kheld:' .. kid)
if not account[1] then return {'miss'} end
local amount = tonumber(ARGV[3])
local available = tonumber(account[1]) - tonumber(account[2] or '0')
if state == 'insufficient_balance' or tonumber(account[1]) <= 0 or available < amount then
  return answer('insufficient_balance', string.format('%.0f', available))
end
if key[5] ~= '' then
  if not account[3] then return {'miss'} end
  local month, spent = string.match(account[3], '^(%S+) (%S+)$')
  local spend = (month == ARGV[8]) and tonumber(spent) or 0
  if state == 'monthly_quota_exceeded'
      or spend + tonumber(account[4] or '0') + amount > tonumber(key[5]) then
    return answer('monthly_quota_exceeded', string.format('%.0f', available))
  end
end
-- The limits library's moving window, on its own list of timestamps (see mirror.rate_window).
if key[8] ~= '' then
  local oldest = redis.call('LINDEX', key[8], tonumber(key[9]) - 1)
  if oldest and tonumber(oldest) >= tonumber(ARGV[9]) - tonumber(key[10]) then
    return answer('rate_limited', string.format('%.0f', available))
  end
end
if ARGV[2] == '' then return answer('checked', string.format('%.0f', available)) end
if key[6] ~= '*' and not string.find(',' .. key[6] .. ',', ',' .. ARGV[2] .. ',', 1, true) then
  return answer('model_not_allowed', string.format('%.0f', available))
end
local hold = key[2] .. ' ' .. kid .. ' ' .. ARGV[3] .. ' ' .. ARGV[5]
if redis.call('HSETNX', KEYS[1], ARGV[4], hold) == 0 then  -- this request id holds already
  local earlier = redis.call('HGET', KEYS[1], ARGV[4])
  local _, _, held, hold_id = string.match(earlier, '^(%S+) (%S+) (%S+) (%S+)')
  return answer('held', string.format('%.0f', available), hold_id, held)
end
if key[8] ~= '' then
  redis.call('LPUSH', key[8], ARGV[9])
  redis.call('LTRIM', key[8], 0, tonumber(key[9]) - 1)
  redis.call('EXPIRE', key[8], key[10])
end
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[4])
redis.call('HINCRBY', name, 'held', ARGV[3])
redis.call('HINCRBY', name, 'kheld:' .. kid, ARGV[3])
return answer('held', string.format('%.0f', available - amount), ARGV[5], ARGV[3])
