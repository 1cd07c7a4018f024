"""The authorize hot path in Redis: key states, balances and holds, checked and held atomically.

Redis keeps a copy of what authorize needs, so that a normal authorize is one script call and
never touches PostgreSQL:

- ``billing:key:<id>`` (written by ``billing.enforcement.mirror``): the key's state and the
  limits it enforces; ``billing:kh:<keyed hash>`` names the key a secret belongs to.
- The key's rate limit: the `limits` library's moving window for Redis, the same list of
  timestamps under the same name (``mirror.rate_window``), tested and counted inside the
  script, so that a request refused for any other reason never counts and an allowed one costs
  one round trip. The library itself reads that window for ``Retry-After``, and limits alone
  where there is no Redis.
- ``billing:acct:<id>``: the account's balance at a ``version`` (``accounts.balance_version``,
  which moves with every balance change, so an older copy never overwrites a newer one), the
  month spend of its capped keys (``spend:<key id>`` = ``YYYY-MM spend``), and the sum of its
  open holds (``held``, and ``kheld:<key id>`` per key).
- ``billing:holds`` (request id -> account, key, amount, hold id, output tokens, a hash of the
  authorize request's parameters) and the sorted set ``billing:holds:expiry``: the open holds;
  ``billing:hid:<hold id>``: what became of a hold (open, released, settled, expired), kept
  until ``HOLD_RECORD_LINGER`` after its expiry, for the gateway's release route.

Invariants:
- A hold is placed only if it fits: balance - held >= amount, tested and reserved in one
  script, so concurrent authorizes never reserve more than the balance. A hold clipped to what
  is available is computed in that same script, from the available balance it reserves from.
- Settlement releases a request's hold in the same script call that copies the balance the
  settlement produced, so the charge is never counted twice nor not at all.
- Everything here may be lost (DESIGN invariant 6): a missing key or account is reloaded from
  PostgreSQL, and holds are reservations, not money. Losing them only lets requests already in
  flight overdraw by what they cost beyond the balance; the ledger stays exact.

Amounts are compared in the scripts as doubles, exact below 2**53 nano-dollars: balances and
caps are copied clamped to ``mirror.EXACT_LIMIT``, which can only refuse more, never allow more.
"""

from __future__ import annotations

import datetime as dt
import threading
import weakref
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis
from redis.commands.core import Script
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.accounts import rollups
from billing.accounts.accounts import Account
from billing.accounts.keys import CHANGE_COMMIT_LAG, ApiKey
from billing.catalog.pricing import HoldTerms
from billing.core.effects import AccountSnapshot
from billing.core.money import FEMTOS_PER_NANO
from billing.enforcement import mirror
from billing.enforcement.rate_limits import RateWindow
from billing.ledger.ledger import LedgerEntry

ACCOUNT_PREFIX = "billing:acct:"
HOLDS = "billing:holds"
EXPIRY = "billing:holds:expiry"
BALANCE_CURSOR = "billing:balances:cursor"
# An unknown secret is remembered as unknown this long, so that guessing does not reach
# PostgreSQL; a key issued later has a different hash, so nothing valid is refused by it.
UNKNOWN_KEY_TTL = 60
UNKNOWN = "-"
HOLD_RECORD = "billing:hid:"
# How long after a hold's expiry Redis still says what became of it (the release route answers
# 404 for a hold it no longer knows).
HOLD_RECORD_LINGER = dt.timedelta(minutes=10)
NO_HOLD = HoldTerms(0, 0, 0, 0)


def _script(name: str) -> str:
    """The Lua script ``lua/<name>.lua``, after the prelude its functions share."""
    lua = resources.files("billing.enforcement").joinpath("lua")
    return lua.joinpath("prelude.lua").read_text() + lua.joinpath(f"{name}.lua").read_text()


# Read once, at import; registered with each Redis client (``HotPath``).
_AUTHORIZE = _script("authorize")
_PUBLISH = _script("publish")
_PURGE = _script("purge")
_RELEASE = _script("release")
_VERIFY = _script("verify")


@dataclass(frozen=True)
class HoldRequest:
    """What to check, and hold if it fits: a model id of None checks the key only.
    ``request_hash`` tells a repeat of an authorize request from another one under its id."""

    key_hash: str
    model_id: str | None
    request_id: str
    hold_id: str
    now: dt.datetime
    expires_at: dt.datetime
    terms: HoldTerms = NO_HOLD
    request_hash: str = ""

    @property
    def amount_nanos(self) -> int:
        """The hold of every output token asked for."""
        return self.terms.full_amount


@dataclass(frozen=True)
class Verdict:
    """What authorize found (see ``lua/authorize.lua``): ``output_tokens`` is what a hold
    covers, ``affordable_tokens`` the most a hold that does not fit could cover."""

    verdict: str
    key_id: str = ""
    account_id: str = ""
    rate_limit: str = ""
    available_nanos: int | None = None
    hold_id: str = ""
    amount_nanos: int = 0
    output_tokens: int = 0
    affordable_tokens: int = 0
    rate_window: RateWindow | None = None
    monthly_cap_nanos: int | None = None
    month_spend_nanos: int | None = None


@dataclass(frozen=True)
class KeyCheck:
    """A key's state as the mirror has it (``lua/verify.lua``), or ``invalid`` / ``miss``."""

    state: str
    key_id: str = ""
    account_id: str = ""
    allowed_models: list[str] | None = None
    rate_limit: str = ""
    rate_window: RateWindow | None = None


def _ms(at: dt.datetime) -> int:
    return int(at.timestamp() * 1000)


def _clamped(nanos: int) -> str:
    return str(max(-mirror.EXACT_LIMIT, min(nanos, mirror.EXACT_LIMIT)))


class _Returned:
    """Gives ``connection`` back to ``pool`` when collected (with its thread's locals)."""

    def __init__(self, pool: redis.ConnectionPool, connection: Any) -> None:
        weakref.finalize(self, pool.release, connection)


class HotPath:
    """The Redis side of authorize for one Redis server."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._authorize = client.register_script(_AUTHORIZE)
        self._publish = client.register_script(_PUBLISH)
        self._purge = client.register_script(_PURGE)
        self._release = client.register_script(_RELEASE)
        self._verify = client.register_script(_VERIFY)
        self._own = threading.local()

    def _evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """``script`` on a connection of this thread's own: the client's per-command pool and
        retry machinery cost about as much CPU as the script itself, once per authorize."""
        connection = getattr(self._own, "connection", None)
        if connection is None:
            pool = self.client.connection_pool
            connection = self._own.connection = pool.get_connection()
            # Given back when the thread ends (its locals go): threads that come and go (a
            # server's per-request threads, a pool's) would otherwise use the pool up.
            self._own.returned = _Returned(pool, connection)
        try:
            try:
                connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return connection.read_response()
            except redis.exceptions.NoScriptError:  # a restarted or flushed Redis
                self.client.script_load(script.script)
                connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError):
            connection.disconnect()
            raise

    def authorize(self, hold: HoldRequest) -> Verdict:
        """Check the key and, for a known model, place the hold if it fits (clipped if the
        terms allow); raises RedisError."""
        terms = hold.terms
        input_nanos, input_femtos = divmod(terms.input_femtos, FEMTOS_PER_NANO)
        output_nanos, output_femtos = divmod(terms.output_femtos_per_token, FEMTOS_PER_NANO)
        answer = self._evalsha(
            self._authorize,
            [HOLDS, EXPIRY],
            [
                hold.key_hash,
                hold.model_id or "",
                hold.amount_nanos,
                hold.request_id,
                hold.hold_id,
                _ms(hold.now),
                _ms(hold.expires_at),
                rollups.month_key(hold.now),
                repr(hold.now.timestamp()),
                hold.request_hash,
                terms.output_tokens,
                terms.min_output_tokens,
                input_nanos,
                input_femtos,
                output_nanos,
                output_femtos,
                _ms(hold.expires_at + HOLD_RECORD_LINGER),
            ],
        )
        verdict, *rest = (part.decode() for part in answer)
        if not rest:
            return Verdict(verdict)
        key_id, account_id, rate_limit, available, hold_id, amount, granted, affordable = rest[:8]
        window = cap = spend = None
        if len(rest) > 8:  # a hold: the key's rate window and cap come with it
            used, oldest, cap_text, spend_text = rest[8:]
            if rate_limit:
                window = RateWindow.of(
                    rate_limit,
                    used=int(used),
                    oldest=float(oldest) if oldest else None,
                    now=hold.now.timestamp(),
                )
            cap = int(cap_text) if cap_text else None
            spend = int(spend_text) if spend_text else None
        return Verdict(
            verdict,
            key_id,
            account_id,
            rate_limit,
            int(available) if available else None,
            hold_id,
            int(amount) if amount else 0,
            int(granted) if granted else 0,
            int(affordable) if affordable else 0,
            window,
            cap,
            spend,
        )

    def verify(self, key_hash: str, *, now: dt.datetime) -> KeyCheck:
        """The state of the key with this hash, as the mirror has it; counts nothing. Raises
        RedisError."""
        answer = self._evalsha(self._verify, [], [key_hash, _ms(now), repr(now.timestamp())])
        state, *rest = (part.decode() for part in answer)
        if not rest:
            return KeyCheck(state)
        key_id, account_id, models, rate_limit, used, oldest = rest
        window = None
        if rate_limit:
            window = RateWindow.of(
                rate_limit,
                used=int(used),
                oldest=float(oldest) if oldest else None,
                now=now.timestamp(),
            )
        return KeyCheck(
            state,
            key_id,
            account_id,
            None if models == mirror.ALL_MODELS else models.split(",") if models else [],
            rate_limit,
            window,
        )

    def publish(self, snapshots: dict[str, AccountSnapshot], released: list[str]) -> int:
        """Copy committed balances (unless newer ones are there) and release the holds of
        settled requests; returns how many holds were released. Raises RedisError."""
        if not snapshots and not released:
            return 0
        return self._published(snapshots, released, status="settled")

    def _published(
        self, snapshots: dict[str, AccountSnapshot], released: list[str], *, status: str
    ) -> int:
        document = {
            "status": status,
            "accounts": [
                [
                    account_id,
                    snapshot.version,
                    _clamped(snapshot.balance_nanos),
                    {
                        key_id: f"{month} {_clamped(spend)}"
                        for key_id, (month, spend) in snapshot.month_spend.items()
                    },
                ]
                for account_id, snapshot in snapshots.items()
            ],
            "released": released,
        }
        return int(self._publish(keys=[HOLDS, EXPIRY], args=[orjson.dumps(document)]))

    def release(self, request_id: str) -> bool:
        """Release one request's hold (a request refused after it was placed)."""
        return self._published({}, [request_id], status="released") == 1

    def release_hold(self, hold_id: str) -> tuple[str, int] | None:
        """Release the hold ``hold_id`` if it is open; returns its status now and the amount
        this call released (0 if it was closed already), or None if Redis does not know the
        hold. Raises RedisError."""
        answer = self._evalsha(self._release, [HOLDS, EXPIRY], [hold_id])
        status, *amount = (part.decode() for part in answer)
        if status == "unknown":
            return None
        return status, int(amount[0])

    def hold_keys(self, request_ids: list[str]) -> dict[str, str]:
        """The key of each of these requests that has an open hold here. Raises RedisError."""
        if not request_ids:
            return {}
        found: list[bytes | None] = self.client.hmget(HOLDS, request_ids)  # type: ignore[assignment]
        return {
            request_id: hold.split(b" ", 2)[1].decode()
            for request_id, hold in zip(request_ids, found, strict=True)
            if hold is not None
        }

    def account_copy(self, account_id: str) -> tuple[int, int] | None:
        """The balance version of the account's copy here and its open holds, read together
        (authorize's view of the account); None if Redis has no copy. Raises RedisError."""
        version, held = self.client.hmget(ACCOUNT_PREFIX + account_id, ["version", "held"])
        if version is None:
            return None
        return int(version), int(held) if held else 0

    def expire(self, *, now: dt.datetime, batch: int = 1000) -> int:
        """Release every hold past its expiry; returns how many."""
        total = 0
        while True:
            count = int(self._purge(keys=[HOLDS, EXPIRY], args=[_ms(now), batch]))
            total += count
            if count < batch:
                return total

    def open_holds(self, *, page: int = 1000) -> tuple[int, int]:
        """How many holds are open here, and their sum in nano-dollars (read page by page, so
        that Redis is never blocked for long)."""
        count = total = 0
        for _, hold in self.client.hscan_iter(HOLDS, count=page):
            count += 1
            total += int(hold.split(b" ", 3)[2])
        return count, total

    def load(self, session: Session, key_hash: str, *, now: dt.datetime) -> bool:
        """Copy the key with this hash and its account from PostgreSQL; False if no key has it
        (remembered for ``UNKNOWN_KEY_TTL`` seconds)."""
        key = session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()
        if key is None:
            self.client.set(mirror.hash_name(key_hash), UNKNOWN, ex=UNKNOWN_KEY_TTL)
            return False
        mirror.write(self.client, [key])
        self.publish({key.account_id: snapshot(session, key.account_id, now=now)}, [])
        return True

    def sync_balances(self, session: Session, *, now: dt.datetime) -> int:
        """Copy the balances of accounts with ledger entries the copy may have missed (an
        after-commit copy lost with its process); returns how many accounts were copied.

        Like the key-state mirror, the cursor only moves past entries older than
        ``keys.CHANGE_COMMIT_LAG``, as ids are assigned at insert, not at commit.
        """
        cursor = self.client.get(BALANCE_CURSOR)
        if cursor is None:
            # A new or flushed Redis: accounts are loaded as authorize needs them.
            last = session.scalar(select(func.max(LedgerEntry.id))) or 0
            self.client.set(BALANCE_CURSOR, last)
            return 0
        rows = session.execute(
            select(LedgerEntry.id, LedgerEntry.account_id, LedgerEntry.created_at)
            .where(LedgerEntry.id > int(cursor))
            .order_by(LedgerEntry.id)
        ).all()
        if not rows:
            return 0
        account_ids = sorted({account_id for _, account_id, _ in rows})
        self.publish({id_: snapshot(session, id_, now=now) for id_ in account_ids}, [])
        settled = [entry_id for entry_id, _, created in rows if created <= now - CHANGE_COMMIT_LAG]
        if settled:
            self.client.set(BALANCE_CURSOR, settled[-1])
        return len(account_ids)


def snapshot(session: Session, account_id: str, *, now: dt.datetime) -> AccountSnapshot:
    """The account's balance and the month spend of its capped keys, read from PostgreSQL."""
    account = session.get_one(Account, account_id)
    capped = list(
        session.scalars(
            select(ApiKey.id).where(
                ApiKey.account_id == account_id, ApiKey.monthly_cap_nanos.is_not(None)
            )
        )
    )
    spend = rollups.month_spend(session, capped, now=now)
    month = rollups.month_key(now)
    return AccountSnapshot(
        account.balance_version,
        account.balance_nanos,
        {key_id: (month, spend.get(key_id, 0)) for key_id in capped},
    )
