"""Usage events and hold releases, sent to the billing service from a background thread.

- Usage is batched: sent when ``batch_max`` events wait, or ``flush_interval`` after the first
  of a batch arrived, whichever comes first. Requests never wait for it.
- Nothing is dropped for a failure that a retry can cure: on a connection error, a timeout, or
  any answer but a 2xx and the few that say the batch itself is malformed (400, 413, 422), the
  same events (so the same request ids: the billing service counts each once) are sent again
  after a backoff that doubles from 0.1 s up to ``retry_max`` seconds, for as long as the
  process lives. Events the billing service rejects one by one (``rejected[]``: an unknown key,
  a request id reused with other content) are logged, not retried: they would be rejected
  again.
- A hold is released (``POST /gateway/v1/holds/{id}/release``) with the same retries; against a
  billing service that predates that route, a zero-token usage event with outcome ``failed``
  releases it instead.
- ``flush`` waits until everything queued is sent (tests, benchmarks, and process exit).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from billing_litellm.client import Reply

log = logging.getLogger("billing_litellm")

# A batch answered with one of these cannot succeed as it is; anything else may.
MALFORMED = frozenset({400, 413, 422})
FIRST_BACKOFF = 0.1


class Sender(Protocol):
    def post_usage(self, events: list[dict[str, Any]]) -> Reply: ...

    def release_hold(self, hold_id: str) -> Reply: ...


@dataclass(frozen=True)
class Release:
    """A hold to release, and the usage event that releases it on an older billing service."""

    hold_id: str
    failed_event: dict[str, Any]


@dataclass
class Counts:
    """What the reporter has done since it started (for logs and tests)."""

    sent: int = 0
    rejected: int = 0
    released: int = 0
    retries: int = 0
    dropped: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)


class UsageReporter:
    """Queues usage events and releases; a daemon thread sends them (see the module doc)."""

    def __init__(
        self,
        sender: Sender,
        *,
        flush_interval: float,
        batch_max: int,
        retry_max: float,
    ) -> None:
        self._sender = sender
        self._interval = flush_interval
        self._batch_max = batch_max
        self._retry_max = retry_max
        self._events: list[dict[str, Any]] = []
        self._releases: list[Release] = []
        self._busy = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.counts = Counts()

    def report(self, event: dict[str, Any]) -> None:
        """Queue one usage event (``POST /gateway/v1/usage`` item)."""
        with self._changed:
            self._events.append(event)
            # Wake the sender only when it has something to decide (a batch begins or is full):
            # waking it for every event made it contend for the GIL with LiteLLM's event loop
            # on every request. It reads the queue before it waits, so no event is missed.
            if len(self._events) == 1 or len(self._events) >= self._batch_max:
                self._changed.notify_all()
        self._ensure_thread()

    def release(self, release: Release) -> None:
        """Queue the release of a hold."""
        with self._changed:
            self._releases.append(release)
            self._changed.notify_all()
        self._ensure_thread()

    def pending(self) -> int:
        with self._changed:
            return len(self._events) + len(self._releases) + self._busy

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until nothing is queued or being sent; True if so."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._changed.notify_all()
            while self._events or self._releases or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.05))
        return True

    def _ensure_thread(self) -> None:
        # A forked worker inherits the queue but not the thread: each process starts its own.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._changed:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="billing-usage", daemon=True)
                self._thread.start()
                atexit.register(self.flush, 5.0)

    def _next(self) -> tuple[list[dict[str, Any]], list[Release]]:
        """Wait for work, then up to ``flush_interval`` for a batch to fill; claim it."""
        with self._changed:
            while not (self._events or self._releases):
                self._changed.wait()
            deadline = time.monotonic() + self._interval
            while len(self._events) < self._batch_max and not self._releases:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            self._busy = True
            return self._events[: self._batch_max], list(self._releases)

    def _run(self) -> None:
        backoff = FIRST_BACKOFF
        while True:
            events, releases = self._next()
            done = False
            try:
                done = self._send(events, releases)
            except Exception:  # whatever failed, the queue is intact: try again after a pause
                log.exception("billing usage sender failed unexpectedly; retrying")
            with self._changed:
                self._busy = False
                self._changed.notify_all()
            if done:
                backoff = FIRST_BACKOFF
                continue
            self.counts.retries += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, self._retry_max)

    def _send(self, events: list[dict[str, Any]], releases: list[Release]) -> bool:
        """Send one batch and the queued releases; True when all went (or can never go)."""
        ok = True
        for release in releases:
            outcome = self._release(release)
            if outcome is None:
                ok = False
                continue
            with self._changed:
                self._releases.remove(release)
                if outcome == "fallback":
                    self._events.append(release.failed_event)
        if events:
            delivered = self._post(events)
            if delivered:
                with self._changed:
                    del self._events[: len(events)]
            ok = ok and delivered
        return ok

    def _release(self, release: Release) -> str | None:
        """ "released", "fallback" (post a failed event instead), or None to retry."""
        try:
            reply = self._sender.release_hold(release.hold_id)
        except httpx.HTTPError as exc:
            log.warning("billing: releasing hold %s failed (%s); retrying", release.hold_id, exc)
            return None
        if reply.status == 200 or (reply.status == 404 and reply.code == "hold_not_found"):
            self.counts.released += 1
            return "released"
        if reply.status == 404:
            return "fallback"
        log.warning(
            "billing: releasing hold %s answered %s; retrying", release.hold_id, reply.status
        )
        return None

    def _post(self, events: list[dict[str, Any]]) -> bool:
        """Post one batch; True when it needs no retry."""
        try:
            reply = self._sender.post_usage(events)
        except httpx.HTTPError as exc:
            log.warning("billing: posting %d usage events failed (%s); retrying", len(events), exc)
            return False
        if 200 <= reply.status < 300:
            rejected = reply.body.get("rejected", []) if isinstance(reply.body, dict) else []
            for rejection in rejected:
                log.error("billing rejected a usage event: %s", rejection)
            self.counts.sent += len(events) - len(rejected)
            self.counts.rejected += len(rejected)
            self.counts.rejections.extend(rejected)
            return True
        ids = [event.get("request_id") for event in events]
        if reply.status in MALFORMED:
            log.error("billing refused a usage batch (%s: %s): %s", reply.status, reply.body, ids)
            self.counts.dropped += len(events)
            return True
        log.warning("billing: usage batch answered %s; retrying %d events", reply.status, len(ids))
        return False
