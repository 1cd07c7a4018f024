-- ARGV: 1 keyed hash, 2 model id ('' when the model is unknown: check the key only), 3 the
-- hold of every output token asked for, 4 request id, 5 hold id, 6 now (ms), 7 expiry (ms),
-- 8 month (YYYY-MM), 9 now (seconds), 10 hash of the request's parameters, 11 output tokens
-- asked for, 12 the fewest a clipped hold may grant, 13-16 the hold's terms (below), 17 when
-- the hold's 'billing:hid:' record lapses (ms).
-- Answers {verdict, key id, account id, rate limit, available, hold id, amount, output
-- tokens granted, output tokens affordable, requests in the rate window, oldest of them,
-- monthly cap, month spend}; the first failing check decides the verdict. A key state's
-- verdict is the state's name, checked in the order of the state table
-- (billing.accounts.key_states, tested row by row against this script); 'invalid' is a secret
-- that names no key.
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
local function answer(verdict, available, hold_id, amount, granted, affordable, tail)
  local answered = {verdict, head[1], head[2], head[3], available or '', hold_id or '',
    amount or '', granted or '', affordable or ''}
  for _, part in ipairs(tail or {}) do table.insert(answered, part) end
  return answered
end
if state == 'revoked' or state == 'disabled' then return answer(state) end
if state == 'expired' or (key[4] ~= '' and tonumber(key[4]) <= now) then
  return answer('expired')
end
if state == 'suspended' then return answer('suspended') end
local name = 'billing:acct:' .. key[2]
local account = redis.call('HMGET', name, 'balance', 'held', 'spend:' .. kid, 'kheld:' .. kid)
if not account[1] then return {'miss'} end
local spend = 0
if key[5] ~= '' then
  if not account[3] then return {'miss'} end
  local month, spent = string.match(account[3], '^(%S+) (%S+)$')
  spend = (month == ARGV[8]) and tonumber(spent) or 0
end
local balance = tonumber(account[1])
local available = balance - tonumber(account[2] or '0')
local shown = string.format('%.0f', available)
-- What a gateway shows of the key with a hold: its rate window and its cap.
local function held(left, hold_id, amount, granted)
  local used, oldest = '', ''
  if key[8] ~= '' then
    used, oldest = window(key[8], tonumber(key[9]), tonumber(key[10]), tonumber(ARGV[9]))
  end
  local spent = key[5] ~= '' and string.format('%.0f', spend) or ''
  return answer('held', left, hold_id, amount, granted, '', {used, oldest, key[5], spent})
end
-- A request id that holds already: its hold if this is the same request, else a conflict.
local earlier = redis.call('HGET', KEYS[1], ARGV[4])
if earlier then
  local _, owner, amount, hold_id, granted, params =
    string.match(earlier, '^(%S+) (%S+) (%S+) (%S+) ?(%S*) ?(%S*)')
  if owner ~= kid or (params ~= '' and params ~= ARGV[10]) then
    return answer('request_id_conflict', shown)
  end
  return held(shown, hold_id, amount, granted ~= '' and granted or ARGV[11])
end
if state == 'insufficient_balance' or balance <= 0 or available <= 0 then
  return answer('insufficient_balance', shown)
end
-- The hold of n output tokens, exact in doubles: the terms come split at the nano-dollar
-- (13: input, whole nano-dollars; 14: and femto-dollars below one; 15, 16: the same per
-- output token), so every product stays far below 2^53.
local function hold_of(n)
  local femtos = tonumber(ARGV[14]) + n * tonumber(ARGV[16])
  local below = math.fmod(femtos, 1000000)
  local nanos = (femtos - below) / 1000000 + (below > 0 and 1 or 0)
  return tonumber(ARGV[13]) + n * tonumber(ARGV[15]) + nanos
end
-- The most output tokens, at most those asked for, whose hold fits; -1 if none does.
local function most_output(limit)
  if hold_of(0) > available then return -1 end
  if hold_of(limit) <= available then return limit end
  local low, high = 0, limit
  while high - low > 1 do
    local mid = math.floor((low + high) / 2)
    if hold_of(mid) <= available then low = mid else high = mid end
  end
  return low
end
local amount, granted = tonumber(ARGV[3]), tonumber(ARGV[11])
if available < amount then
  local most = most_output(granted)
  if most < tonumber(ARGV[12]) then
    local affordable = string.format('%d', math.max(most, 0))
    return answer('hold_exceeds_available', shown, '', '', '', affordable)
  end
  granted, amount = most, hold_of(most)
end
if key[5] ~= '' then
  if state == 'monthly_quota_exceeded'
      or spend + tonumber(account[4] or '0') + amount > tonumber(key[5]) then
    return answer('monthly_quota_exceeded', shown)
  end
end
-- The limits library's moving window, on its own list of timestamps (see mirror.rate_window).
if key[8] ~= '' then
  local oldest = redis.call('LINDEX', key[8], tonumber(key[9]) - 1)
  if oldest and tonumber(oldest) >= tonumber(ARGV[9]) - tonumber(key[10]) then
    return answer('rate_limited', shown)
  end
end
if ARGV[2] == '' then return answer('checked', shown) end
if key[6] ~= '*' and not string.find(',' .. key[6] .. ',', ',' .. ARGV[2] .. ',', 1, true) then
  return answer('model_not_allowed', shown)
end
local placed = string.format('%.0f', amount)
local tokens = string.format('%d', granted)
redis.call('HSET', KEYS[1], ARGV[4],
  key[2] .. ' ' .. kid .. ' ' .. placed .. ' ' .. ARGV[5] .. ' ' .. tokens .. ' ' .. ARGV[10])
redis.call('SET', 'billing:hid:' .. ARGV[5], 'open ' .. ARGV[4], 'PXAT', ARGV[17])
if key[8] ~= '' then
  redis.call('LPUSH', key[8], ARGV[9])
  redis.call('LTRIM', key[8], 0, tonumber(key[9]) - 1)
  redis.call('EXPIRE', key[8], key[10])
end
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[4])
redis.call('HINCRBY', name, 'held', placed)
redis.call('HINCRBY', name, 'kheld:' .. kid, placed)
return held(string.format('%.0f', available - amount), ARGV[5], placed, tokens)
