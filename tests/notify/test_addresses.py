"""Webhook URLs may not reach our own network (issue 10, observation 5; DESIGN 6.4): internal
addresses in every spelling are refused when an endpoint is registered, and again at delivery
on the addresses the name resolves to, and the request goes to the address that was checked.

Only the DNS boundary is stubbed (``socket.getaddrinfo``, for names of our choosing): the
admin API, the delivery code, requests and the receivers are the real ones.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from flask.testing import FlaskClient

from billing.notify import addresses
from billing.runtime import Runtime
from tests.notify.conftest import Receiver, new_account, new_key, start_receiver
from tests.support import assert_error

ENDPOINTS = "/admin/v1/webhook-endpoints"


@pytest.fixture
def strict(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    """The app with WEBHOOK_ALLOW_PRIVATE_URLS off, as in production, for this test only."""
    configured = runtime.settings.model_copy(update={"webhook_allow_private_urls": False})
    monkeypatch.setattr(runtime, "settings", configured)
    return runtime


# The forms of observation 5, and their relatives, each with the words the refusal must say.
INTERNAL = [
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://100.100.100.200/latest/meta-data/", "cloud metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "reserved for local networks"),
    ("http://metadata.goog/computeMetadata/v1/", "reserved for local networks"),
    ("http://metadata/computeMetadata/v1/", "without a domain"),
    ("http://instance-data/latest/", "without a domain"),
    ("http://[::ffff:169.254.169.254]/", "cloud metadata"),
    ("http://[::ffff:a9fe:a9fe]/", "cloud metadata"),
    ("http://[::ffff:127.0.0.1]:6379/", "loopback"),
    ("http://[64:ff9b::a9fe:a9fe]/", "cloud metadata"),  # NAT64
    ("http://[2002:a9fe:a9fe::1]/", "cloud metadata"),  # 6to4
    ("http://[::10.0.0.1]/", "private"),  # IPv4-compatible
    ("http://127.0.0.1:6379/", "loopback"),
    ("http://127.255.0.9/", "loopback"),
    ("http://[::1]:8000/", "loopback"),
    ("http://localhost:8000/", "reserved for local networks"),
    ("http://LOCALHOST./", "reserved for local networks"),
    ("http://api.localhost/", "reserved for local networks"),
    ("http://printer.local/", "reserved for local networks"),
    ("http://db.home.arpa/", "reserved for local networks"),
    ("http://redis:6379/", "without a domain"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://169.254.10.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://0.0.0.0:8000/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://198.18.0.1/", "reserved"),
    ("http://192.0.0.170/", "IETF protocol"),
    ("http://[fec0::1]/", "site-local"),
    ("https://10.1.2.3:8443/hooks", "private"),
]

# Numbers that some parser reads as an address: refused whatever the setting.
NUMERIC = [
    "http://2130706433/",  # 127.0.0.1
    "http://0x7f000001/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://127.0.1/",
    "http://017700000001/",
    "http://0xa9.0xfe.0xa9.0xfe/",  # 169.254.169.254
    "http://134744072/",  # 8.8.8.8: public, and still ambiguous
    "http://www.example.0x10/",
]


@pytest.mark.parametrize(("url", "says"), INTERNAL)
def test_internal_addresses_are_refused_at_registration(
    admin: FlaskClient, strict: Runtime, url: str, says: str
) -> None:
    error = assert_error(admin.post(ENDPOINTS, json={"url": url}), 400, "url_not_allowed", "url")
    assert says in error["message"]
    assert "WEBHOOK_ALLOW_PRIVATE_URLS" in error["message"]
    assert admin.get(ENDPOINTS).get_json()["data"] == []


@pytest.mark.parametrize("url", NUMERIC)
@pytest.mark.parametrize("allow_private", [False, True])
def test_numeric_hosts_are_refused_in_any_setting(
    admin: FlaskClient,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    allow_private: bool,
) -> None:
    configured = runtime.settings.model_copy(update={"webhook_allow_private_urls": allow_private})
    monkeypatch.setattr(runtime, "settings", configured)
    error = assert_error(admin.post(ENDPOINTS, json={"url": url}), 400, "invalid_request", "url")
    assert "dotted-decimal" in error["message"]


@pytest.mark.parametrize(
    "url",
    [
        "https://gw.example.com/hooks",
        "https://GW.Example.com:8443/hooks?tenant=1",
        "http://8.8.8.8/hooks",
        "https://[2606:4700:4700::1111]/hooks",
        "https://[::ffff:8.8.8.8]/hooks",
        "https://xn--bcher-kva.example/hooks",
        "https://gw.example.com./hooks",
    ],
)
def test_public_addresses_and_names_are_accepted(
    admin: FlaskClient, strict: Runtime, url: str
) -> None:
    response = admin.post(ENDPOINTS, json={"url": url})
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["url"] == url


@pytest.mark.parametrize(
    "url",
    [
        "https://bücher.example/hooks",
        "http://gw example.com/",
        "http://[::1/",
        "http://[fe80::zz]/",
    ],
)
def test_hosts_that_are_no_dns_name_nor_address_are_refused(
    admin: FlaskClient, strict: Runtime, url: str
) -> None:
    assert_error(admin.post(ENDPOINTS, json={"url": url}), 400, "invalid_request", "url")


def test_the_setting_allows_private_addresses(admin: FlaskClient, runtime: Runtime) -> None:
    assert runtime.settings.webhook_allow_private_urls  # the tests' settings
    for url in ("http://127.0.0.1:9/x", "http://localhost:9/x", "http://[::ffff:10.0.0.1]/"):
        response = admin.post(ENDPOINTS, json={"url": url})
        assert response.status_code == 201, response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
        ("::ffff:8.8.8.8", None),
        ("127.0.0.1", "a loopback address"),
        ("::ffff:7f00:1", "a loopback address (127.0.0.1) written as IPv6"),
        ("2001:db8::1", "a reserved address"),  # documentation
        ("2001::1", "a reserved address"),  # Teredo
        ("192.0.2.1", "a reserved address"),
    ],
)
def test_the_address_rule(text: str, refused: str | None) -> None:
    assert addresses.refusal(ipaddress.ip_address(text)) == refused


# Delivery: the name is resolved at each attempt, and the checked address is the one used.


@dataclass
class Resolver:
    """Answers for names of the test's choosing (one answer per lookup, the last repeating);
    every other name goes to the real resolver."""

    real: Any
    answers: dict[str, list[list[str]]]
    asked: list[str] = field(default_factory=list)

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self.real(host, port, *args, **kwargs)
        self.asked.append(name)
        queue = self.answers[name]
        found = queue.pop(0) if len(queue) > 1 else queue[0]
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address, int(port), 0, 0) if ":" in address else (address, int(port)),
            )
            for address in found
        ]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    resolver = Resolver(socket.getaddrinfo, {})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    return resolver


def register_url(admin: FlaskClient, receiver: Receiver, url: str) -> str:
    response = admin.post(ENDPOINTS, json={"url": url, "event_types": ["key.created"]})
    assert response.status_code == 201, response.get_data(as_text=True)
    receiver.secret = response.get_json()["secret"]
    return str(response.get_json()["id"])


def only_delivery(admin: FlaskClient, endpoint_id: str) -> dict[str, Any]:
    [summary] = admin.get(f"{ENDPOINTS}/{endpoint_id}/deliveries").get_json()["data"]
    detail: dict[str, Any] = admin.get(f"/admin/v1/webhook-deliveries/{summary['id']}").get_json()
    return detail


def port_of(receiver: Receiver) -> int:
    return int(receiver.server.server_address[1])


def test_a_public_name_that_resolves_to_loopback_is_refused_at_delivery(
    admin: FlaskClient, strict: Runtime, receiver: Receiver, dns: Resolver
) -> None:
    dns.answers["hooks.example.com"] = [["127.0.0.1"]]
    endpoint_id = register_url(admin, receiver, f"http://hooks.example.com:{port_of(receiver)}/h")
    assert dns.asked == []  # registration resolves nothing
    new_key(admin, new_account(admin))

    assert strict.deliver_webhooks() == 1
    assert receiver.requests() == []
    detail = only_delivery(admin, endpoint_id)
    assert detail["status"] == "failed"  # at once: a refused address is not retried
    assert detail["next_attempt_at"] is None
    assert detail["attempts"] == 1
    [attempt] = detail["attempt_log"]
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("refused: hooks.example.com resolves to 127.0.0.1")
    assert "loopback" in attempt["error"]
    assert detail["last_error"] == attempt["error"]
    assert dns.asked == ["hooks.example.com"]
    assert strict.deliver_webhooks() == 0


def test_every_address_a_name_resolves_to_is_checked(
    admin: FlaskClient, strict: Runtime, receiver: Receiver, dns: Resolver
) -> None:
    # The public address comes first; nothing is sent to it (nor anywhere) since one is private.
    dns.answers["hooks.example.com"] = [["93.184.215.14", "10.20.30.40"]]
    endpoint_id = register_url(admin, receiver, "https://hooks.example.com/h")
    new_key(admin, new_account(admin))

    assert strict.deliver_webhooks() == 1
    detail = only_delivery(admin, endpoint_id)
    assert detail["status"] == "failed"
    assert "resolves to 10.20.30.40, a private address" in detail["last_error"]
    assert dns.asked == ["hooks.example.com"]


def test_an_endpoint_registered_before_the_rule_is_refused_at_delivery(
    admin: FlaskClient, runtime: Runtime, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint_id = register_url(admin, receiver, receiver.url)  # allowed: tests' settings
    new_key(admin, new_account(admin))
    configured = runtime.settings.model_copy(update={"webhook_allow_private_urls": False})
    monkeypatch.setattr(runtime, "settings", configured)

    assert runtime.deliver_webhooks() == 1
    assert receiver.requests() == []
    detail = only_delivery(admin, endpoint_id)
    assert detail["status"] == "failed"
    assert detail["last_error"].startswith("refused: url must not point at 127.0.0.1")


def test_the_request_goes_to_the_address_checked_not_to_a_second_lookup(
    admin: FlaskClient, runtime: Runtime, receiver: Receiver, dns: Resolver
) -> None:
    # A rebinding name: the first lookup answers the receiver's address, any later one another
    # loopback address where nothing listens. Private addresses are allowed here (the tests'
    # settings), so what is checked is which lookup the connection used.
    dns.answers["hooks.example.com"] = [["127.0.0.1"], ["127.0.0.2"]]
    port = port_of(receiver)
    endpoint_id = register_url(admin, receiver, f"http://hooks.example.com:{port}/h?x=1#frag")
    new_key(admin, new_account(admin))

    assert runtime.deliver_webhooks() == 1
    [request] = receiver.requests()
    assert request.error is None and request.answered == 200
    assert request.headers["host"] == f"hooks.example.com:{port}"
    assert only_delivery(admin, endpoint_id)["status"] == "succeeded"
    assert dns.asked == ["hooks.example.com"]


def test_a_resolution_failure_is_retried_like_an_unreachable_receiver(
    admin: FlaskClient, strict: Runtime, receiver: Receiver, dns: Resolver
) -> None:
    dns.answers["gone.example.com"] = [[]]
    endpoint_id = register_url(admin, receiver, "https://gone.example.com/h")
    new_key(admin, new_account(admin))

    assert strict.deliver_webhooks() == 1
    detail = only_delivery(admin, endpoint_id)
    assert detail["status"] == "pending"
    assert detail["last_error"].startswith("ConnectionError: could not resolve the host")


# https: the connection goes to the checked address, and TLS still names (SNI) and verifies the
# host of the URL.


@dataclass
class TlsReceiver:
    receiver: Receiver
    server_names: list[str | None]


@pytest.fixture
def tls_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TlsReceiver]:
    """A receiver over TLS with a certificate for hooks.example.test from a CA of the test's
    own, which requests trusts for this test (REQUESTS_CA_BUNDLE)."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("hooks.example.test").configure_cert(context)
    server_names: list[str | None] = []
    context.sni_callback = lambda _socket, name, _context: server_names.append(name)
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    running = start_receiver(context)
    yield TlsReceiver(running, server_names)
    running.server.shutdown()
    running.server.server_close()


def test_https_to_a_pinned_address_sends_and_verifies_the_name(
    admin: FlaskClient, runtime: Runtime, tls_receiver: TlsReceiver, dns: Resolver
) -> None:
    receiver = tls_receiver.receiver
    dns.answers["hooks.example.test"] = [["127.0.0.1"], ["127.0.0.2"]]
    port = port_of(receiver)
    endpoint_id = register_url(admin, receiver, f"https://hooks.example.test:{port}/h")
    new_key(admin, new_account(admin))

    assert runtime.deliver_webhooks() == 1
    [request] = receiver.requests()
    assert request.error is None and request.answered == 200
    assert request.headers["host"] == f"hooks.example.test:{port}"
    assert tls_receiver.server_names == ["hooks.example.test"]
    assert only_delivery(admin, endpoint_id)["status"] == "succeeded"
    assert dns.asked == ["hooks.example.test"]


def test_https_refuses_a_certificate_for_another_name(
    admin: FlaskClient, runtime: Runtime, tls_receiver: TlsReceiver, dns: Resolver
) -> None:
    receiver = tls_receiver.receiver
    dns.answers["other.example.test"] = [["127.0.0.1"]]
    endpoint_id = register_url(admin, receiver, f"https://other.example.test:{port_of(receiver)}/")
    new_key(admin, new_account(admin))

    assert runtime.deliver_webhooks() == 1
    assert receiver.requests() == []
    assert tls_receiver.server_names == ["other.example.test"]
    detail = only_delivery(admin, endpoint_id)
    assert detail["status"] == "pending"
    assert detail["last_error"].startswith("SSLError")
    assert "other.example.test" in detail["last_error"]
