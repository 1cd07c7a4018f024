"""A real webhook receiver: an HTTP server on 127.0.0.1, in a thread, that verifies every request
with the `standardwebhooks` library exactly as a gateway would, and answers with scripted
status codes. Plus helpers that set accounts, keys and endpoints up through the HTTP API.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

# doubao-seed-2-0-mini, the shipped price table: 140 and 690 nano-USD per input/output token.
MODEL = "doubao-seed-2-0-mini"


@dataclass
class Received:
    """One request the receiver got, and whether its signature verified."""

    headers: dict[str, str]
    body: bytes
    answered: int
    payload: dict[str, Any] | None  # the verified body; None when verification failed
    error: str | None

    @property
    def type(self) -> str:
        assert self.payload is not None, self.error
        return str(self.payload["type"])

    @property
    def data(self) -> dict[str, Any]:
        assert self.payload is not None, self.error
        return self.payload["data"]


@dataclass
class Receiver:
    """A gateway's webhook endpoint. ``secret`` is set once the endpoint is registered."""

    server: ThreadingHTTPServer
    scheme: str = "http"
    secret: str | None = None
    script: list[int] = field(default_factory=list)  # answers to give first, then 200
    redirect_to: str | None = None  # the Location of a 3xx answer
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{self.scheme}://{host!s}:{port}/hooks"

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        payload, error = None, None
        try:
            assert self.secret is not None, "a request came before the endpoint existed"
            payload = Webhook(self.secret).verify(body, headers)
        except (WebhookVerificationError, AssertionError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self.lock:
            status = 400 if error else (self.script.pop(0) if self.script else 200)
            self.received.append(Received(headers, body, status, payload, error))
        return status

    def requests(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def wait_for(
        self, predicate: Callable[[list[Received]], Any], what: str, timeout: float = 30
    ) -> Any:
        """Poll until ``predicate(requests so far)`` is truthy, and return it."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.requests())
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; received: {self.requests()}")
            time.sleep(0.05)


def _handler(receiver_of: Callable[[], Receiver]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {name.lower(): value for name, value in self.headers.items()}
            receiver = receiver_of()
            status = receiver.handle(headers, body)
            self.send_response(status)
            if 300 <= status < 400 and receiver.redirect_to:
                self.send_header("Location", receiver.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    return Handler


def start_receiver(tls: ssl.SSLContext | None = None) -> Receiver:
    """A receiver serving on 127.0.0.1 in a thread of its own; over TLS with ``tls``."""
    holder: list[Receiver] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(lambda: holder[0]))
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    holder.append(Receiver(server, scheme="http" if tls is None else "https"))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return holder[0]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A running receiver, shut down after the test."""
    running = start_receiver()
    yield running
    running.server.shutdown()
    running.server.server_close()


@pytest.fixture
def second_receiver() -> Iterator[Receiver]:
    running = start_receiver()
    yield running
    running.server.shutdown()
    running.server.server_close()


# Setting things up through the API (any Flask test client or requests-like client)


def register(admin: Any, receiver: Receiver, event_types: list[str] | None = None) -> str:
    """Register ``receiver`` as an endpoint and hand it its secret; returns the endpoint id."""
    body: dict[str, Any] = {"url": receiver.url}
    if event_types is not None:
        body["event_types"] = event_types
    response = admin.post("/admin/v1/webhook-endpoints", json=body)
    assert response.status_code == 201, response.get_data(as_text=True)
    created = response.get_json()
    receiver.secret = created["secret"]
    return str(created["id"])


def new_account(admin: Any, credit: str | None = None) -> str:
    response = admin.post("/admin/v1/accounts", json={"name": "hooked"})
    assert response.status_code == 201, response.get_data(as_text=True)
    account_id = str(response.get_json()["id"])
    if credit is not None:
        adjust(admin, account_id, credit)
    return account_id


def adjust(admin: Any, account_id: str, amount: str) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": amount, "reason": "webhook test"},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert response.status_code == 201, response.get_data(as_text=True)


def new_key(admin: Any, account_id: str) -> str:
    response = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "k"})
    assert response.status_code == 201, response.get_data(as_text=True)
    return str(response.get_json()["id"])


def report_usage(gateway: Any, key_id: str, input_tokens: int, output_tokens: int) -> None:
    response = gateway.post(
        "/gateway/v1/usage",
        json={
            "request_id": f"req-{uuid.uuid4()}",
            "key_id": key_id,
            "model": MODEL,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
        },
    )
    assert response.status_code == 202, response.get_data(as_text=True)


def key_changes(requests: list[Received], key_id: str) -> list[dict[str, Any]]:
    """The verified ``key.state_changed`` payloads about ``key_id``, in arrival order."""
    return [
        request.data
        for request in requests
        if request.payload is not None
        and request.type == "key.state_changed"
        and request.data["key_id"] == key_id
    ]


def body_json(request: Received) -> dict[str, Any]:
    return json.loads(request.body)
