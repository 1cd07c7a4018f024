"""What a client is answered when the integration refuses a request. Pure.

Every refusal is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``, with the
billing service's own ``code`` (``insufficient_balance``, ``rate_limit_exceeded``...), never the
HTTP status LiteLLM would put there, and its ``Retry-After`` where it has one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The header that says a refusal came from the local key-state cache, with no call to billing.
DECISION_HEADER = "x-billing-decision"


@dataclass(frozen=True)
class Refusal:
    """An error answer: HTTP status, the OpenAI error fields, and headers to send with it."""

    status: int
    message: str
    type: str
    code: str
    param: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def error(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


def from_billing(status: int, body: Any, headers: Mapping[str, str]) -> Refusal:
    """The billing service's own refusal (a 4xx), relayed as it was."""
    error = body.get("error") if isinstance(body, Mapping) else None
    error = error if isinstance(error, Mapping) else {}
    kept = {"Retry-After": headers["retry-after"]} if "retry-after" in headers else {}
    return Refusal(
        status=status,
        message=str(error.get("message") or f"The billing service refused the request ({status})."),
        type=str(error.get("type") or "invalid_request_error"),
        code=str(error.get("code") or status),
        param=error.get("param") if isinstance(error.get("param"), str) else None,
        headers=kept,
    )


def billing_unavailable(detail: str) -> Refusal:
    """503: the billing service could not say whether the key may proceed, so it may not."""
    return Refusal(
        status=503,
        message=f"Billing is unavailable, so the request was not sent: {detail} Try again shortly.",
        type="api_error",
        code="billing_unavailable",
        headers={"Retry-After": "1"},
    )


def unsupported_route(route: str) -> Refusal:
    return Refusal(
        status=404,
        message=f"{route} is not offered through this gateway.",
        type="invalid_request_error",
        code="unsupported_route",
    )


def master_key_not_billable() -> Refusal:
    return Refusal(
        status=401,
        message="The proxy's master key cannot make model requests here: use a customer key.",
        type="invalid_request_error",
        code="invalid_api_key",
    )


def missing_model() -> Refusal:
    return Refusal(
        status=400,
        message="The request names no model.",
        type="invalid_request_error",
        code="invalid_request",
        param="model",
    )


# How each key state is answered (the billing service's state table, DESIGN section 5); a
# webhook's own http_status and code win when it carries them.
_STATES: Mapping[str, tuple[int, str, str, str]] = {
    "revoked": (401, "invalid_api_key", "invalid_request_error", "Incorrect API key provided."),
    "disabled": (401, "invalid_api_key", "invalid_request_error", "Incorrect API key provided."),
    "expired": (401, "invalid_api_key", "invalid_request_error", "Incorrect API key provided."),
    "suspended": (
        451,
        "content_policy_violation",
        "invalid_request_error",
        "This key is suspended after repeated content policy violations.",
    ),
    "insufficient_balance": (
        402,
        "insufficient_balance",
        "insufficient_quota",
        "Your balance is insufficient. Please top up your account.",
    ),
    "monthly_quota_exceeded": (
        429,
        "monthly_quota_exceeded",
        "insufficient_quota",
        "This key has used its monthly spend cap.",
    ),
}


def from_key_state(
    state: str, http_status: int | None, code: str | None, *, now: dt.datetime
) -> Refusal:
    """The refusal of a key whose cached state is not active."""
    status, default_code, type_, message = _STATES.get(
        state, (http_status or 403, code or state, "invalid_request_error", f"This key is {state}.")
    )
    status = http_status or status
    headers = {DECISION_HEADER: "key-state-cache"}
    if status == 429:
        headers["Retry-After"] = str(seconds_to_next_month(now))
    return Refusal(status, message, type_, code or default_code, headers=headers)


def seconds_to_next_month(now: dt.datetime) -> int:
    """Whole seconds (at least 1) from ``now`` to the start of the next UTC month."""
    now = now.astimezone(dt.UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    start = dt.datetime(year, month, 1, tzinfo=dt.UTC)
    return max(1, int((start - now).total_seconds() + 0.999))
