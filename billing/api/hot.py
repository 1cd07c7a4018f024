"""``POST /gateway/v1/authorize`` and ``POST /gateway/v1/keys/verify`` on the hot path:
answered in front of Flask when memory and Redis can answer them, which they nearly always can.

The gateway calls authorize before every request it forwards, so its cost is added to every
model call. Flask's request machinery (contexts, hooks, the OpenAPI wrapper) costs more than
the authorization itself, so this WSGI middleware answers the common case directly: a gateway
token accepted within the last seconds, a body that validates, a model whose price is
remembered, a key and account Redis holds. Anything else (a token not seen lately, a client
address over the failed-authentication limit, a body without a Content-Length or over
``MAX_CONTENT_LENGTH``, a body that does not validate, a key Redis lacks, Redis down) goes on to
the Flask route, untouched and with the body intact (or unread), which answers it the same way
with the database at hand. The answers are rendered by the same functions as the route's.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from billing.access.auth import Role
from billing.api.gateway import ALLOWED, AuthorizeIn, authorized
from billing.api.gateway_keys import VerifyIn, key_verified
from billing.core import metrics
from billing.core.db import utcnow
from billing.core.errors import BillingError
from billing.enforcement.authorize import NeedsDatabase
from billing.http.context import address_of
from billing.http.errors import error_document
from billing.http.inputs import InvalidJson, parse_json

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from billing.runtime import Runtime

PATH = "/gateway/v1/authorize"
VERIFY_PATH = "/gateway/v1/keys/verify"


class AuthorizeFastPath:
    """WSGI middleware answering authorize and verify from memory and Redis, else passing them
    on."""

    def __init__(self, app: WSGIApplication, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path not in (PATH, VERIFY_PATH) or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        if path == VERIFY_PATH:
            return self._verify(environ, start_response)
        started = time.perf_counter()
        answer = self._fast(environ, verify=False)
        if answer is None:
            # The Flask route counts its decision; its time is counted here, whole.
            response = self.app(environ, start_response)
            metrics.AUTHORIZE_APP_SECONDS.observe(time.perf_counter() - started)
            return response
        status, document, headers = answer
        metrics.count_authorize(
            status, document["error"]["code"] if status != 200 else ALLOWED, path="fast"
        )
        response = _respond(start_response, status, document, headers)
        metrics.AUTHORIZE_FAST_SECONDS.observe(time.perf_counter() - started)
        return response

    def _verify(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        answer = self._fast(environ, verify=True)
        if answer is None:
            return self.app(environ, start_response)
        return _respond(start_response, *answer)

    def _fast(
        self, environ: WSGIEnvironment, *, verify: bool
    ) -> tuple[int, dict[str, Any], list[tuple[str, str]]] | None:
        """The answer from memory and Redis, or None with the body left for the Flask route."""
        if self.runtime.hotpath is None or not self._accepted(environ):
            # Only a body from a gateway known here, of a declared length within the limit, is
            # read here; anything else reaches Flask unread, which checks the size and the
            # token before it reads a byte.
            return None
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        answer = self._answer(body, verify=verify)
        if answer is None:
            environ["wsgi.input"] = io.BytesIO(body)
        return answer

    def _accepted(self, environ: WSGIEnvironment) -> bool:
        """Whether the request carries a gateway token accepted lately and a declared body
        length within ``MAX_CONTENT_LENGTH``: what must hold before its body is read."""
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if (
            scheme.lower() != "bearer"
            or self.runtime.gateway_actors.cached(token.strip(), role=Role.GATEWAY) is None
            # An address over the failed-authentication limit: the route answers its 429.
            or self.runtime.auth_failures.retry_after(Role.GATEWAY, address_of(environ)) is not None
        ):
            return False
        length = environ.get("CONTENT_LENGTH") or ""
        return length.isdigit() and int(length) <= self.runtime.settings.max_content_length

    def _answer(
        self, body: bytes, *, verify: bool
    ) -> tuple[int, dict[str, Any], list[tuple[str, str]]] | None:
        authorizer = self.runtime.authorizer
        try:
            # The app's one JSON parser (duplicate keys, depth), then the route's model.
            document = parse_json(body)
            if verify:
                api_key = VerifyIn.model_validate(document).api_key
                return 200, key_verified(authorizer.verify(None, api_key, now=utcnow())), []
            request = AuthorizeIn.model_validate(document).request()
            result = authorizer.authorize(None, request, now=utcnow())
        except (ValidationError, InvalidJson, NeedsDatabase):
            return None
        except BillingError as exc:
            headers = [] if exc.retry_after is None else [("Retry-After", str(exc.retry_after))]
            document = error_document(exc.message, code=exc.code, type_=exc.type, param=exc.param)
            return exc.status, document, headers
        return 200, authorized(result), []


def _respond(
    start_response: StartResponse,
    status: int,
    document: dict[str, Any],
    headers: list[tuple[str, str]],
) -> list[bytes]:
    payload = orjson.dumps(document) + b"\n"
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(payload))), *headers],
    )
    return [payload]
