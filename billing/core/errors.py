"""The base of every domain error.

A domain error carries what the HTTP edge needs to render it in the OpenAI error shape
(``{"error": {"message", "type", "param", "code"}}``); rendering happens in one place,
``billing.http.errors``. Specific errors live next to the code that raises them.
"""

from __future__ import annotations


class BillingError(Exception):
    """A failure the caller can act on. Subclasses set ``status``, ``code`` and ``type``."""

    status = 400
    code = "invalid_request"
    type = "invalid_request_error"
    retry_after: int | None = None
    """Seconds after which a retry may succeed (sent as ``Retry-After``); None: not said."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(BillingError):
    """The request is malformed or breaks a rule; ``param`` names the offending field."""


class NotFound(BillingError):
    """The named resource does not exist."""

    status = 404
    code = "not_found"


class Conflict(BillingError):
    """The request conflicts with the current state (e.g. a reused idempotency key)."""

    status = 409
    code = "conflict"
