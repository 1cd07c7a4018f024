"""The billing service's gateway API (``/gateway/v1``) and customer routes, over HTTP.

Authorize, verify and the dashboard pass-through run on LiteLLM's event loop (one
``aiohttp.ClientSession`` per loop, connections kept alive); usage, releases and the key-state
feed run on the integration's own threads (one ``httpx.Client``). Every call has the configured
timeout.

aiohttp rather than ``httpx.AsyncClient`` on the loop: LiteLLM serves every request on one busy
event loop, so the client's CPU per call is added to every request's latency (times the number
of requests in flight). Measured on the same authorize call: 0.9 ms of CPU with aiohttp (C HTTP
parser), 2.4 ms with httpx's pure-Python async stack (issue #12's overhead benchmark).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

from billing_litellm.config import Config
from billing_litellm.refusals import Refusal, billing_unavailable, from_billing


class Refused(Exception):
    """The billing service refused (a 4xx): ``refusal`` is what the client is answered."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


@dataclass(frozen=True)
class Reply:
    """An answer of the billing service: status, parsed JSON body (None if not JSON)."""

    status: int
    body: Any

    @property
    def code(self) -> str | None:
        error = self.body.get("error") if isinstance(self.body, Mapping) else None
        return error.get("code") if isinstance(error, Mapping) else None


@dataclass(frozen=True)
class Passed:
    """A customer route's answer, as the billing service gave it."""

    status: int
    content: bytes
    headers: Mapping[str, str]


class Unreachable(Exception):
    """The billing service could not be reached (connection error or timeout)."""


def _parse(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _json(response: httpx.Response) -> Any:
    return _parse(response.content)


class GatewayClient:
    """Calls the billing service with the gateway token."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._headers = {"Authorization": f"Bearer {config.gateway_token}"}
        self._async: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = None
        self._sync: httpx.Client | None = None
        self._lock = threading.Lock()

    # On LiteLLM's event loop

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop or self._async[1].closed:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=200),
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
            )
            self._async = (loop, session)
        return self._async[1]

    def _url(self, path: str) -> str:
        return self.config.billing_url.rstrip("/") + path

    async def _gateway(self, path: str, payload: Mapping[str, Any]) -> Any:
        """POST to the gateway API; the 2xx body, or raises Refused for a 4xx, or Refused with
        ``billing_unavailable`` for a timeout, a connection error or a 5xx."""
        try:
            async with self._session().post(
                self._url(f"/gateway/v1{path}"), json=payload, headers=self._headers
            ) as response:
                status, headers, content = response.status, response.headers, await response.read()
        except TimeoutError:
            raise Refused(billing_unavailable("it did not answer in time.")) from None
        except aiohttp.ClientError as exc:
            raise Refused(billing_unavailable(f"{type(exc).__name__}.")) from None
        body = _parse(content)
        if status >= 500 or body is None:
            raise Refused(billing_unavailable(f"it answered {status}."))
        if status >= 400:
            if status == 404 and Reply(404, body).code == "not_found":
                raise Refused(
                    billing_unavailable(f"it has no {path} route (it predates gateway API v2).")
                )
            raise Refused(from_billing(status, body, headers))
        return body

    async def authorize(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /gateway/v1/authorize``: the hold, or raises Refused."""
        body: dict[str, Any] = await self._gateway("/authorize", payload)
        return body

    async def verify(self, api_key: str) -> dict[str, Any]:
        """``POST /gateway/v1/keys/verify``: the key's state, or raises Refused."""
        body: dict[str, Any] = await self._gateway("/keys/verify", {"api_key": api_key})
        return body

    async def customer_get(self, path: str, *, query: str, authorization: str | None) -> Passed:
        """A customer route of the billing service, called with the customer's own bearer key;
        raises Unreachable when it cannot be reached in time."""
        headers = {"Authorization": authorization} if authorization else {}
        url = self._url(path + (f"?{query}" if query else ""))
        try:
            async with self._session().get(url, headers=headers) as response:
                return Passed(response.status, await response.read(), response.headers.copy())
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unreachable(type(exc).__name__) from None

    # On the integration's threads

    def _sync_client(self) -> httpx.Client:
        with self._lock:
            if self._sync is None:
                self._sync = httpx.Client(
                    base_url=self.config.billing_url,
                    timeout=self.config.timeout_seconds,
                    headers=self._headers,
                )
            return self._sync

    def post_usage(self, events: list[dict[str, Any]]) -> Reply:
        """``POST /gateway/v1/usage`` with ``{"events": [...]}``; raises httpx.HTTPError."""
        response = self._sync_client().post("/gateway/v1/usage", json={"events": events})
        return Reply(response.status_code, _json(response))

    def release_hold(self, hold_id: str) -> Reply:
        """``POST /gateway/v1/holds/{hold_id}/release``; raises httpx.HTTPError."""
        response = self._sync_client().post(f"/gateway/v1/holds/{hold_id}/release")
        return Reply(response.status_code, _json(response))

    def key_states(self, cursor: str | None) -> tuple[list[Mapping[str, Any]], str, bool]:
        """One page of ``GET /gateway/v1/key-states``: (changes, next cursor, has more);
        raises httpx.HTTPError, or RuntimeError for an answer that is not a page."""
        params = {"limit": "1000"} | ({"cursor": cursor} if cursor else {})
        response = self._sync_client().get("/gateway/v1/key-states", params=params)
        body = _json(response)
        if response.status_code != 200 or not isinstance(body, Mapping):
            raise RuntimeError(f"key-state feed answered {response.status_code}")
        data = body.get("data")
        items = (
            [item for item in data if isinstance(item, Mapping)] if isinstance(data, list) else []
        )
        return items, str(body.get("next_cursor") or cursor or ""), bool(body.get("has_more"))
