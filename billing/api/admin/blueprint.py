"""The admin blueprint (``/admin/v1``) that every resource module adds its routes to.

Every route requires an admin bearer token (checked before anything else), and every write that
succeeds is recorded in the audit log in the same transaction.
"""

from __future__ import annotations

from typing import Any

from flask import Response, g, request
from flask_openapi3 import APIBlueprint

from billing.access import audit
from billing.access.auth import Role, authenticate
from billing.api import schemas
from billing.http.context import authenticated, bearer_token, now, session, settings

SECURITY: list[dict[str, list[str]]] = [{"admin": []}]
# 429: an address over the failed-authentication limit (billing.access.failures).
ERRORS: dict[int | str, Any] = {
    **schemas.ANY_ROUTE_ERRORS,
    401: schemas.ErrorOut,
    404: schemas.ErrorOut,
    429: schemas.ErrorOut,
}

admin = APIBlueprint(
    "admin", __name__, url_prefix="/admin/v1", abp_security=SECURITY, abp_responses=ERRORS
)


@admin.before_request
def _authenticate() -> None:
    config = settings()
    bootstrap = (
        config.billing_admin_token.get_secret_value() if config.billing_admin_token else None
    )
    g.actor = authenticated(
        Role.ADMIN,
        lambda: authenticate(
            session(),
            bearer_token(),
            role=Role.ADMIN,
            bootstrap=bootstrap,
            hmac_key=config.hmac_key,
        ),
    )


@admin.after_request
def _audit(response: Response) -> Response:
    if request.method != "GET" and response.status_code < 400 and "actor" in g:
        body = response.get_json(silent=True) or {}
        target = body.get("id") or next(iter((request.view_args or {}).values()), None)
        audit.record(
            session(),
            actor=g.actor,
            action=f"{request.method} {rule.rule if (rule := request.url_rule) else request.path}",
            target_id=str(target) if target is not None else None,
            status=response.status_code,
            request=request.get_json(silent=True),
            now=now(),
        )
    return response
