-- ARGV: keyed hash, now (ms), now (seconds). Answers the key's state as the mirror has it
-- (its expiry read against the clock), counting nothing: {state, key id, account id, allowed
-- models, rate limit, requests in its window, oldest of them}; {'invalid'} for a secret of no
-- key, {'miss'} when the mirror lacks the key.
local kid = redis.call('GET', 'billing:kh:' .. ARGV[1])
if kid == '-' then return {'invalid'} end
if not kid then return {'miss'} end
local key = redis.call('HMGET', 'billing:key:' .. kid,
  'state', 'account_id', 'key_hash', 'expires_ms', 'models', 'rate_limit',
  'rate_key', 'rate_amount', 'rate_expiry')
local state = key[1]
if not state or not key[7] then return {'miss'} end
if key[3] ~= ARGV[1] then return {'invalid'} end
if key[4] ~= '' and tonumber(key[4]) <= tonumber(ARGV[2])
    and state ~= 'revoked' and state ~= 'disabled' then
  state = 'expired'
end
local used, oldest = '', ''
if key[7] ~= '' then
  used, oldest = window(key[7], tonumber(key[8]), tonumber(key[9]), tonumber(ARGV[3]))
end
return {state, kid, key[2], key[5], key[6], used, oldest}
