"""The local key-state cache: keys the billing service has blocked are refused here, without a
round trip.

It is fed only by the billing service's key events: signed webhooks (``key.created``,
``key.state_changed``) and the ``GET /gateway/v1/key-states`` feed, polled as a catch-up. Each
key keeps its newest state: a delivery older than the one held (a lower ``sequence``; before
sequences, an earlier ``changed_at``) is dropped, so retries and reordering never bring back an
old state, and a duplicate changes nothing.

Customer requests carry the key's secret, events its id: the cache learns which secret is which
id from the billing service's authorize and verify answers (it keeps a SHA-256 of the secret,
never the secret). A key it has not yet seen answered is simply not in the cache.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from standardwebhooks import Webhook

log = logging.getLogger("billing_litellm")

ACTIVE = "active"
KEY_EVENT_TYPES = frozenset({"key.created", "key.state_changed"})
# States a free route (the model list) still serves: the key is valid, only spending is blocked.
SPENDING_BLOCKED = frozenset({"insufficient_balance", "monthly_quota_exceeded"})


@dataclass(frozen=True)
class KeyState:
    """A key's state as one event told it."""

    key_id: str
    state: str
    http_status: int | None
    code: str | None
    sequence: int | None
    changed_at: dt.datetime | None

    def newer_than(self, held: KeyState) -> bool:
        """Whether this event supersedes ``held`` (an equal one does not: a duplicate)."""
        if self.sequence is not None and held.sequence is not None:
            return self.sequence > held.sequence
        if self.changed_at is not None and held.changed_at is not None:
            return self.changed_at > held.changed_at
        return True


def _timestamp(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def parse_key_event(data: Mapping[str, Any]) -> KeyState | None:
    """The key state a webhook's ``data`` or a feed item tells; None if it names no key or
    state. Reads the v2 fields (``state``, ``code``, ``sequence``) and the earlier ones
    (``new_state``)."""
    key_id, state = data.get("key_id"), data.get("state") or data.get("new_state")
    if not isinstance(key_id, str) or not isinstance(state, str):
        return None
    status, code, sequence = data.get("http_status"), data.get("code"), data.get("sequence")
    return KeyState(
        key_id=key_id,
        state=state,
        http_status=status if type(status) is int else None,
        code=code if isinstance(code, str) else None,
        sequence=sequence if type(sequence) is int else None,
        changed_at=_timestamp(data.get("changed_at")),
    )


def digest(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


class KeyStateCache:
    """Key states by key id, and key ids by secret digest; safe to share between threads."""

    def __init__(self, *, max_keys: int = 100_000) -> None:
        self._states: dict[str, KeyState] = {}
        self._key_ids: OrderedDict[bytes, str] = OrderedDict()
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def remember(self, api_key: str, key_id: str) -> None:
        """Note that ``api_key`` is the key ``key_id`` (learned from an authorize or verify)."""
        secret = digest(api_key)
        with self._lock:
            self._key_ids[secret] = key_id
            self._key_ids.move_to_end(secret)
            while len(self._key_ids) > self._max_keys:
                self._key_ids.popitem(last=False)

    def apply(self, event: KeyState) -> bool:
        """Hold ``event`` unless a newer state of its key is held; True if it was applied."""
        with self._lock:
            held = self._states.get(event.key_id)
            if held is not None and not event.newer_than(held):
                return False
            self._states[event.key_id] = event
            return True

    def blocked(self, api_key: str, *, spending: bool) -> KeyState | None:
        """The cached state that refuses ``api_key``, or None (active, or not known here).

        A request that spends is refused in every state but active; a free one only when the
        key itself is refused (invalid, suspended), not when only its spending is blocked.
        """
        with self._lock:
            key_id = self._key_ids.get(digest(api_key))
            held = self._states.get(key_id) if key_id is not None else None
        if held is None or held.state == ACTIVE:
            return None
        if not spending and held.state in SPENDING_BLOCKED:
            return None
        return held


class WebhookReceiver:
    """Verifies Standard Webhooks deliveries and applies the key events among them."""

    def __init__(self, secret: str, cache: KeyStateCache) -> None:
        self._webhook = Webhook(secret)
        self._cache = cache

    def receive(self, body: bytes, headers: Mapping[str, str]) -> bool:
        """Apply a delivery; raises WebhookVerificationError before reading an unsigned one.
        True if it changed a key's cached state."""
        payload = self._webhook.verify(body, dict(headers))
        if not isinstance(payload, Mapping) or payload.get("type") not in KEY_EVENT_TYPES:
            return False
        data = payload.get("data")
        event = parse_key_event(data) if isinstance(data, Mapping) else None
        if event is None:
            log.warning("billing webhook %s names no key state", headers.get("webhook-id"))
            return False
        return self._cache.apply(event)


class KeyStatePoller:
    """Catches up on key-state changes from ``GET /gateway/v1/key-states`` every ``interval``
    seconds, in a daemon thread (webhooks carry changes at once; this covers missed ones)."""

    def __init__(
        self,
        fetch: Callable[[str | None], tuple[list[Mapping[str, Any]], str, bool]],
        cache: KeyStateCache,
        *,
        interval: float,
    ) -> None:
        self._fetch = fetch
        self._cache = cache
        self._interval = interval
        self._cursor: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="billing-key-states", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self) -> int:
        """Read the feed from where the last poll stopped, to its end; returns changes applied."""
        applied = 0
        while True:
            items, self._cursor, has_more = self._fetch(self._cursor)
            for item in items:
                event = parse_key_event(item)
                applied += event is not None and self._cache.apply(event)
            if not has_more:
                return applied

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # the feed is a catch-up: whatever failed, try again next time
                log.warning("billing key-state feed unavailable; retrying", exc_info=True)
            self._stop.wait(self._interval)
