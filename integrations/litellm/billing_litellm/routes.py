"""The routes the integration adds to LiteLLM's app.

- ``GET /v1/dashboard/billing/subscription`` and ``/v1/dashboard/billing/usage`` (and the same
  without ``/v1``, as some chat clients call them): passed through to the billing service with
  the customer's own bearer key and query, and answered as it answers (status, JSON body,
  ``Retry-After``); 503 ``billing_unavailable`` when it cannot be reached.
- ``POST BILLING_WEBHOOK_PATH`` (default ``/billing/webhooks``), when ``BILLING_WEBHOOK_SECRET``
  is set: the billing service's signed webhooks, verified (Standard Webhooks) before anything
  is read, feeding the key-state cache. 204 when accepted; 400 for a bad signature or an old
  timestamp (Standard Webhooks allows five minutes).

These routes do not go through LiteLLM's auth: the billing service checks the customer key, and
the webhook signature is the webhook's credential.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from standardwebhooks import WebhookVerificationError

from billing_litellm.client import Unreachable
from billing_litellm.refusals import Refusal, billing_unavailable
from billing_litellm.runtime import Runtime

DASHBOARD_PATHS = ("/dashboard/billing/subscription", "/dashboard/billing/usage")


def _error(refusal: Refusal) -> JSONResponse:
    return JSONResponse(
        {"error": refusal.error()}, status_code=refusal.status, headers=dict(refusal.headers)
    )


def install(rt: Runtime) -> None:
    """Add the routes to LiteLLM's app, once (LiteLLM may load the hooks module twice)."""
    from litellm.proxy.proxy_server import app

    add_routes(app, rt)


def _dashboard(rt: Runtime, target: str) -> Callable[[Request], Awaitable[Response]]:
    """The handler passing a dashboard route through to ``target`` on the billing service."""

    async def dashboard(request: Request) -> Response:
        try:
            answer = await rt.client.customer_get(
                target,
                query=request.url.query,
                authorization=request.headers.get("authorization"),
            )
        except Unreachable as exc:
            return _error(billing_unavailable(f"{exc}."))
        headers = {
            name: answer.headers[name]
            for name in ("content-type", "retry-after")
            if name in answer.headers
        }
        return Response(answer.content, status_code=answer.status, headers=headers)

    return dashboard


def add_routes(app: FastAPI, rt: Runtime) -> None:
    present = {getattr(route, "path", None) for route in app.routes}
    for path in DASHBOARD_PATHS:
        handler = _dashboard(rt, "/v1" + path)
        for public in (path, "/v1" + path):
            if public not in present:
                app.add_api_route(public, handler, methods=["GET"], include_in_schema=False)

    receiver = rt.receiver
    if receiver is None or rt.config.webhook_path in present:
        return

    async def webhook(request: Request) -> Response:
        try:
            receiver.receive(await request.body(), request.headers)
        except WebhookVerificationError as exc:
            message = f"Webhook refused: {exc}"
            return _error(Refusal(400, message, "invalid_request_error", "bad_signature"))
        return Response(status_code=204)

    app.add_api_route(rt.config.webhook_path, webhook, methods=["POST"], include_in_schema=False)
