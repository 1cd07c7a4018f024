"""Where webhooks may go: the endpoint URL rule, and the address check that keeps an admin token
from turning deliveries into requests to our own network (SSRF; DESIGN 6.4).

Invariants:
- An endpoint URL is absolute http(s), with a host and no credentials, a usable port, and at
  most ``MAX_URL_LENGTH`` characters. A numeric host is written canonically (dotted-decimal
  IPv4, bracketed IPv6), whatever the setting: ``2130706433``, ``0x7f.1`` and ``0177.0.0.1``
  mean different addresses to different parsers, so none of them is accepted.
- Unless private addresses are allowed (``WEBHOOK_ALLOW_PRIVATE_URLS``), no webhook request
  reaches an address that is not public: loopback, private (RFC 1918, ULA), link-local, cloud
  metadata, shared (CGNAT), reserved, unspecified or multicast, IPv4 spelled inside IPv6
  included, nor a host named for a local network (``localhost``, ``*.internal``, a name
  without a dot...). The URL is checked when it is registered; at each delivery its name is
  resolved once, every address it resolves to is checked, and the request goes to the checked
  address (``PinnedAdapter``), so a second resolution cannot send it elsewhere (DNS
  rebinding). Redirects are never followed (the caller's ``allow_redirects=False``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import SplitResult, urlsplit, urlunsplit

from requests import PreparedRequest
from requests.adapters import HTTPAdapter

from billing.core.errors import InvalidRequest
from billing.notify.models import MAX_URL_LENGTH

if TYPE_CHECKING:
    from requests.adapters import _HostParams, _PoolKwargs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_HINT = "WEBHOOK_ALLOW_PRIVATE_URLS allows them for local development"

# Cloud metadata services: AWS, GCP, Azure, Oracle (169.254.169.254), AWS over IPv6, ECS task
# metadata, Alibaba Cloud. Most are refused as link-local anyway; the name says more.
_METADATA = frozenset(
    ipaddress.ip_address(text)
    for text in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
# What the ipaddress module of Python 3.11 calls global but is not a reachable public host.
_SPECIAL: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("100.64.0.0/10"), "a shared (carrier-grade NAT) address"),
    (ipaddress.ip_network("192.0.0.0/24"), "an IETF protocol assignment"),
    (ipaddress.ip_network("192.88.99.0/24"), "a 6to4 relay anycast address"),
    (ipaddress.ip_network("fec0::/10"), "a site-local address"),
    (ipaddress.ip_network("64:ff9b:1::/48"), "a local-use NAT64 address"),
)
_PRIVATE = tuple(
    ipaddress.ip_network(text)
    for text in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Names that only ever mean something on a local network (RFC 6761, 6762, 8375; ICANN's
# .internal), and GCP's metadata name outside .internal.
_LOCAL_SUFFIXES = ("localhost", "local", "internal", "localdomain", "home.arpa")
_LOCAL_NAMES = frozenset({"metadata.goog"})
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# WHATWG URL: a host whose last label is a number is an IPv4 address, in some spelling.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


class AddressRefused(InvalidRequest):
    """The URL's host is, or resolves to, an address webhooks may not be sent to."""

    code = "url_not_allowed"


@dataclass(frozen=True)
class Destination:
    """Where one request goes: ``url`` names the checked address in place of the host, and
    ``host_header`` the host as registered (the Host header, and TLS's name, for ``https``)."""

    url: str
    host_header: str
    address: IPAddress


@dataclass(frozen=True)
class _Target:
    parts: SplitResult
    host: str  # lower case, no brackets, no trailing dot
    port: int
    literal: IPAddress | None


def refusal(address: IPAddress) -> str | None:
    """Why webhooks may not go to ``address`` (e.g. "a loopback address"); None if they may."""
    if address in _METADATA:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address) and not (
        address.is_loopback or address.is_unspecified
    ):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = refusal(embedded)
            return None if reason is None else f"{reason} ({embedded}) written as IPv6"
    for network, kind in _SPECIAL:
        if address in network:
            return kind
    checks = (
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_multicast, "a multicast address"),
        (any(address in network for network in _PRIVATE), "a private address"),
        (address.is_private or address.is_reserved or not address.is_global, "a reserved address"),
    )
    return next((kind for refused, kind in checks if refused), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64, compatible), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def checked_url(url: str, *, allow_private: bool) -> str:
    """``url``, stripped, if webhooks may be sent to it; raises InvalidRequest (or its
    AddressRefused) naming ``url`` otherwise. Resolves no name: delivery does."""
    _target(url.strip(), allow_private=allow_private)
    return url.strip()


def resolve(url: str, *, allow_private: bool) -> Destination:
    """The destination of one request to ``url``: its host resolved once, every address
    checked, the first one chosen. Raises AddressRefused (or InvalidRequest for a URL that is
    no longer usable), or OSError when the name does not resolve."""
    target = _target(url, allow_private=allow_private)
    if target.literal is not None:
        found = [target.literal]
    else:
        found = []
        for *_, sockaddr in socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM):
            address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            if address not in found:
                found.append(address)
        if not found:
            raise OSError(f"{target.host} resolves to no address")
    if not allow_private:
        for address in found:
            reason = refusal(address)
            if reason is not None:
                raise AddressRefused(
                    f"{target.host} resolves to {address}, {reason}: webhooks go to public"
                    f" addresses only ({ALLOW_HINT}).",
                    param="url",
                )
    address = found[0]
    netloc = f"[{address}]" if address.version == 6 else str(address)
    pinned = target.parts._replace(netloc=f"{netloc}:{target.port}", fragment="")
    return Destination(urlunsplit(pinned), target.parts.netloc, address)


def _target(url: str, *, allow_private: bool) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise InvalidRequest("url is not a usable URL.", param="url") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidRequest(
            "url must be an absolute http:// or https:// URL with a host.", param="url"
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(
            "url must not carry credentials: the signature authenticates each request.",
            param="url",
        )
    if port == 0 or len(url) > MAX_URL_LENGTH:
        raise InvalidRequest("url is not a usable URL.", param="url")
    host = host.removesuffix(".")
    literal = _literal(host)
    if not allow_private:
        reason = refusal(literal) if literal is not None else _local_name(host)
        if reason is not None:
            raise AddressRefused(
                f"url must not point at {host}, {reason}: webhooks go to public addresses only"
                f" ({ALLOW_HINT}).",
                param="url",
            )
    default = 443 if parts.scheme == "https" else 80
    return _Target(parts, host, port or default, literal)


def _literal(host: str) -> IPAddress | None:
    """The IP address ``host`` spells canonically, or None for a DNS name; raises
    InvalidRequest for anything else (a numeric form, characters a DNS name cannot hold)."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidRequest("url has an invalid IPv6 address.", param="url") from None
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidRequest(
            "url's host must be a DNS name (internationalised names in their xn-- form) or an"
            " IP address.",
            param="url",
        )
    if not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        raise InvalidRequest(
            f"url's host {host} is a number but not a dotted-decimal IPv4 address; write"
            " addresses as four decimal numbers (e.g. 192.0.2.10).",
            param="url",
        ) from None


def _local_name(host: str) -> str | None:
    if host in _LOCAL_NAMES or any(
        host == suffix or host.endswith("." + suffix) for suffix in _LOCAL_SUFFIXES
    ):
        return "a name reserved for local networks"
    if "." not in host:
        return "a name without a domain (resolved by local search domains)"
    return None


class PinnedAdapter(HTTPAdapter):
    """Sends each request to the address in its URL (a ``Destination.url``); for ``https``,
    TLS sends and verifies the name of the ``Host`` header instead of that address."""

    def build_connection_pool_key_attributes(
        self,
        request: PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        name = urlsplit("//" + request.headers.get("Host", "")).hostname
        if host_params["scheme"] == "https" and name and name != host_params["host"]:
            # urllib3 pool keys take both; requests' stubs list only the keys requests sets.
            pool_kwargs = cast(
                "_PoolKwargs", {**pool_kwargs, "server_hostname": name, "assert_hostname": name}
            )
        return host_params, pool_kwargs
