"""The gateway's routes around authorize (``/gateway/v1``, on the gateway blueprint): checking
a key without a hold, and giving a hold back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from billing.accounts.key_states import ENFORCEMENT
from billing.api import schemas
from billing.api.gateway import TAGS, RateLimitOut, gateway, rate_limit
from billing.core.money import format_usd
from billing.enforcement.authorize import KeyStatus
from billing.http.context import now, session
from billing.runtime import current_runtime


class VerifyIn(BaseModel):
    api_key: str = Field(max_length=200, description="The customer's key, `sk-...`.")


class KeyVerified(BaseModel):
    """A key that may still be used (any other is answered 401), and how it is answered now."""

    object: Literal["key"] = "key"
    key_id: str
    account_id: str
    state: Literal["active", "insufficient_balance", "monthly_quota_exceeded", "suspended"]
    http_status: Literal[200, 402, 429, 451] = Field(
        description="What the key's state is answered with; the gateway decides per route (it "
        "may list models for a 402 key, and refuse a 451 key everything)."
    )
    code: Literal["insufficient_balance", "monthly_quota_exceeded", "content_policy_violation"] | (
        None
    ) = Field(description="The `error.code` of the state's refusal; null while active.")
    allowed_models: list[str] | None = Field(description="null: every model.")
    rate_limit: RateLimitOut | None = Field(description="Now, counting nothing; null: no limit.")


@gateway.post("/keys/verify", tags=TAGS, responses={200: KeyVerified})
def verify_key(body: VerifyIn) -> dict[str, Any]:
    """Check a key without placing a hold or counting against its rate limit (for free routes
    such as `/v1/models`).

    An unknown, revoked, expired or disabled key is 401 `invalid_api_key`, as on authorize;
    any other key is answered with its state. Served by `billing.api.hot` without Flask
    whenever Redis and memory can answer.
    """
    return key_verified(current_runtime().authorizer.verify(session, body.api_key, now=now()))


def key_verified(status: KeyStatus) -> dict[str, Any]:
    """The 200 answer of verify (``KeyVerified``)."""
    enforcement = ENFORCEMENT[status.state]
    return {
        "object": "key",
        "key_id": status.key_id,
        "account_id": status.account_id,
        "state": status.state.value,
        "http_status": enforcement.http_status,
        "code": enforcement.code,
        "allowed_models": status.allowed_models,
        "rate_limit": rate_limit(status.rate_window),
    }


class HoldPath(BaseModel):
    hold_id: str = Field(max_length=200)


class HoldReleased(BaseModel):
    object: Literal["hold"] = "hold"
    id: str
    status: Literal["released", "settled", "expired"] = Field(
        description="What became of the hold: released (by this call or an earlier one),"
        " settled by its usage, or expired."
    )
    released_usd: str = Field(description="Released by this call; 0 when it was closed already.")


@gateway.post(
    "/holds/<hold_id>/release",
    tags=TAGS,
    responses={200: HoldReleased, 404: schemas.ErrorOut},
)
def release_hold(path: HoldPath) -> dict[str, Any]:
    """Release a hold whose request will report no usage (the upstream failed before any
    tokens). Idempotent: a closed hold is answered with what became of it. Usage reported
    later under the hold's request id is still settled, at its real cost. A hold Redis no
    longer knows (lost with it, or released more than 10 minutes after its expiry) is 404
    `hold_not_found`: nothing is held any more.
    """
    status, released = current_runtime().authorizer.release(session, path.hold_id, now=now())
    return {
        "object": "hold",
        "id": path.hold_id,
        "status": status.value,
        "released_usd": format_usd(released),
    }
