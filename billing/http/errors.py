"""The one place failures become HTTP responses, all in the OpenAI error shape.

``{"error": {"message": "...", "type": "...", "param": ..., "code": "..."}}`` so that the
gateway can relay our answers verbatim.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from flask import Flask, Response, jsonify, request
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from billing.core.errors import BillingError
from billing.http.inputs import InvalidJson, body_too_large, parse_json

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int,
    message: str,
    *,
    code: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
) -> Response:
    """An OpenAI-shaped error response."""
    response = jsonify(error_document(message, code=code, type_=type_, param=param))
    response.status_code = status
    return response


def error_document(
    message: str, *, code: str, type_: str = "invalid_request_error", param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_detail(exc: BillingError) -> dict[str, Any]:
    """``exc`` as the inner object of the error shape, as a batch answers each rejected item."""
    return {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}


def validation_error_response(exc: ValidationError) -> Response:
    """A 400 naming the first field pydantic refused (flask-openapi3's validation callback)."""
    if request.method != "GET":
        try:
            json_body()
        except InvalidJson as invalid:
            return billing_error_response(invalid)
    error = exc.errors(include_url=False)[0]
    location = [str(part) for part in error["loc"]]
    param = ".".join(location) or None
    if error["type"] == "missing":
        message = f"{param} is required."
    elif not location:
        message = "The request body must be a JSON object."
    else:
        detail = str(error["msg"]).removeprefix("Value error, ")
        message = f"{param}: {detail}"
    return error_response(400, message, code="invalid_request", param=param)


def json_body() -> Any:
    """The request's JSON body (None if there is none); raises InvalidJson if it is not JSON
    we accept (``billing.http.inputs.parse_json``) and BodyTooLarge past the limit."""
    data = request.get_data(cache=True)
    return parse_json(data) if data else None


def billing_error_response(exc: BillingError) -> Response:
    """The OpenAI-shaped response of a domain error, with ``Retry-After`` when it says when."""
    response = error_response(
        exc.status, exc.message, code=exc.code, type_=exc.type, param=exc.param
    )
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if isinstance(exc, RequestEntityTooLarge) and request.max_content_length is not None:
        # A body sent without a Content-Length, cut off by Werkzeug at the limit.
        return billing_error_response(body_too_large(request.max_content_length))
    if exc.response is not None and exc.response.is_json:
        return cast(Response, exc.response)  # already rendered (a validation error)
    response = error_response(
        status,
        exc.description or exc.name,
        code=HTTP_CODES.get(status, exc.name.lower().replace(" ", "_")),
    )
    # What the exception says beside its page: Allow on a 405, WWW-Authenticate, Retry-After.
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _database_unavailable(exc: OperationalError) -> Response:
    log.error("database unavailable on %s %s: %s", request.method, request.path, exc.orig)
    return error_response(
        503,
        "The billing database is unavailable. Nothing was recorded; retry shortly.",
        code="service_unavailable",
        type_="server_error",
    )


def commit_failed(exc: Exception) -> Response:
    """The answer when a request's commit fails: nothing it did was recorded."""
    if isinstance(exc, OperationalError):
        return _database_unavailable(exc)
    return _unexpected(exc)


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(
        500,
        "The server had an error while processing your request.",
        code="internal_error",
        type_="server_error",
    )


def register_error_handlers(app: Flask) -> None:
    """Route every failure through the renderers above."""
    app.register_error_handler(BillingError, billing_error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(OperationalError, _database_unavailable)
    app.register_error_handler(Exception, _unexpected)
    app.validation_error_callback = validation_error_response  # type: ignore[attr-defined]
