-- ARGV: hold id. Releases that hold if it is open. Answers {status, amount released} ('0'
-- when it was closed already), or {'unknown'} when Redis does not know the hold.
local pointer = redis.call('GET', 'billing:hid:' .. ARGV[1])
if not pointer then return {'unknown'} end
local status, rid = string.match(pointer, '^(%S+) (.*)$')
if status ~= 'open' then return {status, '0'} end
local hold = redis.call('HGET', KEYS[1], rid)
if not hold then return {'released', '0'} end
local _, _, amount, hold_id = string.match(hold, '^(%S+) (%S+) (%S+) (%S+)')
if hold_id ~= ARGV[1] then return {'released', '0'} end
release(rid, 'released')
return {'released', amount}
