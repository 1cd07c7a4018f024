"""LiteLLM's hooks: what ``config.yaml`` points at.

    general_settings:
      custom_auth: billing_litellm.proxy.custom_auth
    litellm_settings:
      callbacks: billing_litellm.proxy.usage_logger

The life of a billed request (Chat Completions, Completions, Responses API):

1. ``custom_auth``: a key the local cache knows is blocked is refused at once. Otherwise a new
   request id is minted (never taken from the client) and the billing service authorizes it
   with the request's ``input_bytes`` and requested output; a refusal is answered with the
   billing error as it came (status, ``code``, ``Retry-After``). The grant (request id, hold,
   granted output) rides on the request's auth object.
2. ``async_pre_call_hook``: the granted ``max_output_tokens`` is set on the upstream request.
3. ``async_log_success_event``: the upstream's usage is queued for the billing service.
   ``async_post_call_failure_hook``: the hold is released.

Free routes (the model list) are checked with ``/keys/verify`` (no hold); every other route is
refused to customer keys. The proxy's master key reaches LiteLLM's own routes, never a billed
one. Importing this module also adds the integration's routes to LiteLLM's app (``routes``).
"""

from __future__ import annotations

import datetime as dt
import hmac
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth
from litellm.proxy.auth.auth_utils import get_request_route
from litellm.proxy.common_utils.http_parsing_utils import read_request_body

from billing_litellm import refusals, routes
from billing_litellm.client import Refused
from billing_litellm.errors import BillingRefusal
from billing_litellm.estimate import (
    Api,
    billed_api,
    estimate_input,
    is_free,
    output_cap,
    requested_output,
)
from billing_litellm.reporter import Release
from billing_litellm.runtime import Runtime, runtime
from billing_litellm.usage import usage_report

# Where the grant rides: the auth object's metadata, which LiteLLM copies into the request's
# logging metadata as ``user_api_key_metadata`` (a client cannot set it).
GRANT = "billing"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def new_request_id() -> str:
    """A request id for one upstream request: minted here, unique, never the client's."""
    return f"litellm-{uuid.uuid4().hex}"


async def custom_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """LiteLLM's ``custom_auth``: who may make this request, and its hold (see the module doc)."""
    try:
        return await _authenticate(runtime(), request, get_request_route(request), api_key)
    except Refused as refused:
        raise BillingRefusal(refused.refusal) from None


def _is_master_key(api_key: str) -> bool:
    from litellm.proxy import proxy_server

    master = proxy_server.master_key
    return bool(master) and hmac.compare_digest(api_key.encode(), str(master).encode())


def _refuse_blocked(rt: Runtime, api_key: str, *, spending: bool) -> None:
    held = rt.cache.blocked(api_key, spending=spending)
    if held is not None:
        raise Refused(refusals.from_key_state(held.state, held.http_status, held.code, now=_now()))


async def _authenticate(rt: Runtime, request: Request, route: str, api_key: str) -> UserAPIKeyAuth:
    api = billed_api(route)
    if _is_master_key(api_key):
        if api is not None:
            raise Refused(refusals.master_key_not_billable())
        return UserAPIKeyAuth(api_key=api_key, user_role=LitellmUserRoles.PROXY_ADMIN)
    if api is None:
        if not is_free(route):
            raise Refused(refusals.unsupported_route(route))
        return await _verify(rt, api_key)
    body = await read_request_body(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Refused(refusals.missing_model())
    _refuse_blocked(rt, api_key, spending=True)
    estimate = estimate_input(body, api, media_tokens=rt.config.media_tokens)
    requested = requested_output(body, api)
    request_id = new_request_id()
    payload: dict[str, Any] = {
        "api_key": api_key,
        "model": model,
        "request_id": request_id,
        "input_tokens": estimate.input_tokens,
        "input_bytes": estimate.input_bytes,
    }
    if requested is not None:
        payload["max_output_tokens"] = requested
    answer = await rt.client.authorize(payload)
    rt.cache.remember(api_key, answer["key_id"])
    granted = answer.get("max_output_tokens")
    grant = {
        "request_id": request_id,
        "hold_id": answer["hold_id"],
        "key_id": answer["key_id"],
        "model": model,
        "api": api.name,
        # An answer without it (a billing service before v2) caps nothing.
        "max_output_tokens": granted if type(granted) is int else None,
        "clipped": answer.get("clipped") is True,
        "rate_limit": answer.get("rate_limit"),
    }
    return UserAPIKeyAuth(api_key=api_key, key_alias=answer["key_id"], metadata={GRANT: grant})


async def _verify(rt: Runtime, api_key: str) -> UserAPIKeyAuth:
    """A free route: the key must exist and not be refused outright (invalid, suspended)."""
    _refuse_blocked(rt, api_key, spending=False)
    answer = await rt.client.verify(api_key)
    rt.cache.remember(api_key, answer["key_id"])
    if answer.get("http_status") == 451:
        state, code = str(answer.get("state")), answer.get("code")
        raise Refused(refusals.from_key_state(state, 451, code, now=_now()))
    models = answer.get("allowed_models")
    return UserAPIKeyAuth(
        api_key=api_key,
        key_alias=answer["key_id"],
        models=models if isinstance(models, list) else [],
    )


def _grant(metadata: Any) -> dict[str, Any] | None:
    grant = metadata.get(GRANT) if isinstance(metadata, Mapping) else None
    return grant if isinstance(grant, dict) else None


def _logged_grant(kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    params = kwargs.get("litellm_params")
    metadata = params.get("metadata") if isinstance(params, Mapping) else None
    return _grant(metadata.get("user_api_key_metadata") if isinstance(metadata, Mapping) else None)


class BillingLogger(CustomLogger):
    """Caps the upstream request, reports its usage, releases its hold when it fails."""

    async def async_pre_call_hook(
        self, user_api_key_dict: UserAPIKeyAuth, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        grant = _grant(user_api_key_dict.metadata)
        if grant is not None:
            data.update(output_cap(data, Api[grant["api"]], grant["max_output_tokens"]))
        return data

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        grant = _logged_grant(kwargs)
        if grant is None:
            return
        usage = getattr(response_obj, "usage", None)
        if usage is None and isinstance(response_obj, Mapping):
            usage = response_obj.get("usage")
        report = usage_report(usage)
        rt = runtime()
        if report is None:
            # Nothing to charge by: free the hold rather than keep it until it lapses.
            rt.reporter.release(_release(grant))
            return
        ended = end_time if isinstance(end_time, dt.datetime) else _now()
        rt.reporter.report(
            {
                "request_id": grant["request_id"],
                "key_id": grant["key_id"],
                "model": grant["model"],
                "usage": report,
                "occurred_at": _rfc3339(ended if ended.tzinfo else ended.astimezone()),
                "outcome": "completed",
            }
        )

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> None:
        grant = _grant(user_api_key_dict.metadata)
        if grant is not None:
            runtime().reporter.release(_release(grant))

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: UserAPIKeyAuth,
        response: Any,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, Any] | None = None,
    ) -> dict[str, str] | None:
        grant = _grant(user_api_key_dict.metadata)
        return None if grant is None else response_headers(grant)


def response_headers(grant: Mapping[str, Any]) -> dict[str, str]:
    """The request id, the granted output when it was clipped, and the key's rate limit in
    OpenAI's ``x-ratelimit-*`` headers (when the key has one)."""
    headers = {"x-billing-request-id": str(grant["request_id"])}
    if grant.get("clipped") and grant.get("max_output_tokens") is not None:
        headers["x-billing-max-output-tokens"] = str(grant["max_output_tokens"])
    limit = grant.get("rate_limit")
    if isinstance(limit, Mapping) and all(
        type(limit.get(name)) is int for name in ("limit", "remaining", "reset_seconds")
    ):
        headers["x-ratelimit-limit-requests"] = str(limit["limit"])
        headers["x-ratelimit-remaining-requests"] = str(limit["remaining"])
        headers["x-ratelimit-reset-requests"] = f"{limit['reset_seconds']}s"
    return headers


def _release(grant: Mapping[str, Any]) -> Release:
    return Release(
        hold_id=grant["hold_id"],
        failed_event={
            "request_id": grant["request_id"],
            "key_id": grant["key_id"],
            "model": grant["model"],
            "input_tokens": 0,
            "output_tokens": 0,
            "occurred_at": _rfc3339(_now()),
            "outcome": "failed",
        },
    )


usage_logger = BillingLogger()
routes.install(runtime())
