"""What a request must be before any view reads it: the one JSON parser, the body limit, and
text without NUL characters.

- **Size.** A body over ``MAX_CONTENT_LENGTH`` is answered 413 before anything else (the
  credentials included): a declared ``Content-Length`` is checked unread, and a body sent
  without one (chunked) is read up to one byte past the limit.
- **JSON.** Every JSON body is parsed here (``BodyJSONProvider`` is the app's JSON, so
  flask-openapi3 reads bodies through it too): duplicate keys, NaN and Infinity, invalid UTF-8
  and nesting deeper than ``MAX_JSON_DEPTH`` are refused with a 400 that says which.
- **NUL.** PostgreSQL cannot store U+0000 in text, so text holding it is refused with a 400
  naming where it is: in the URL (path segments and query parameters) for every route here, and
  in bodies by the API's input models (``billing.api.schemas.Input``) with ``refuse_nul``.
"""

from __future__ import annotations

import io
import re
from typing import Any

import jiter
import orjson
from flask import Flask, request
from flask.json.provider import DefaultJSONProvider

from billing.core.errors import BillingError, InvalidRequest
from billing.core.text import find_nul, printable

MAX_JSON_DEPTH = 200
"""Deepest nesting of arrays and objects a JSON body may have (jiter's own recursion limit)."""

_DUPLICATE = re.compile(r'Detected duplicate key "(?P<key>.*)" at (?P<where>line \d+ column \d+)')


class InvalidJson(InvalidRequest, ValueError):
    """The request body is not JSON we accept. A ValueError too, as every JSON parser's errors
    are: ``request.get_json(silent=True)`` counts on it."""

    code = "invalid_json"


class BodyTooLarge(BillingError):
    """The request body is over ``MAX_CONTENT_LENGTH``."""

    status = 413
    code = "request_too_large"


class TextWithNul(InvalidRequest):
    """Text holds a NUL character (U+0000), which PostgreSQL cannot store."""


def parse_json(data: bytes) -> Any:
    """``data`` as JSON; raises InvalidJson for anything but one strict JSON document.

    Integers of any size are read exactly; a duplicate key, NaN or Infinity, invalid UTF-8 or
    nesting past ``MAX_JSON_DEPTH`` is refused, with a message saying which.
    """
    try:
        # "keys": object keys repeat from item to item; values (request ids) rarely do.
        return jiter.from_json(
            data, allow_inf_nan=False, catch_duplicate_keys=True, cache_mode="keys"
        )
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _invalid(reason: str) -> InvalidJson:
    duplicate = _DUPLICATE.match(reason)
    if duplicate:
        key = duplicate["key"]
        return InvalidJson(
            f'The request body has the key "{key}" more than once ({duplicate["where"]});'
            " send each key once.",
            param=key,
        )
    if reason.startswith("recursion limit exceeded"):
        return InvalidJson(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.")
    return InvalidJson(f"The request body is not valid JSON: {reason}.")


class BodyJSONProvider(DefaultJSONProvider):
    """The app's JSON: bodies parsed by ``parse_json``, answers written by orjson.

    orjson writes a 1000-event answer several times faster than the standard library; what it
    does not serialise the way Flask does (dates, decimals) goes through Flask's own default,
    and what it cannot write at all (an integer beyond 64 bits, nesting past 255) through the
    standard library.
    """

    sort_keys = False  # fields in schema order

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if kwargs.keys() - {"separators"} or kwargs.get("separators", (",", ":")) != (",", ":"):
            return super().dumps(obj, **kwargs)
        try:
            return orjson.dumps(
                obj, default=self.default, option=orjson.OPT_PASSTHROUGH_DATETIME
            ).decode()
        except orjson.JSONEncodeError:
            return super().dumps(obj, separators=(",", ":"))

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return parse_json(s.encode() if isinstance(s, str) else s)


def refuse_nul(value: Any, where: str = "") -> None:
    """Raise TextWithNul naming the first place in ``value`` that holds a NUL character."""
    found = find_nul(value, where)
    if found is not None:
        name = printable(found)
        raise TextWithNul(
            f"{name or 'The text'} contains a NUL character (U+0000), which is not allowed.",
            param=name or None,
        )


def _check_request() -> None:
    # Before any view or credential check: nothing reads a body that is too large, and no NUL
    # in the URL reaches a query.
    limit = request.max_content_length
    length = request.content_length
    if limit is not None and length is None and _chunked():
        length = _buffer_unsized_body(limit)
    if limit is not None and (length or 0) > limit:
        raise body_too_large(limit)
    refuse_nul(request.view_args or {})
    refuse_nul({name: _one_or_all(request.args.getlist(name)) for name in request.args})


def _chunked() -> bool:
    # A body sent chunked, which the server (gunicorn) ends for us: "wsgi.input_terminated".
    encoding = request.headers.get("Transfer-Encoding", "").lower()
    return "chunked" in encoding and bool(request.environ.get("wsgi.input_terminated"))


def _buffer_unsized_body(limit: int) -> int:
    """Read a body sent without a Content-Length (chunked) up to one byte past ``limit``, keep
    it for the view, and return how long it was (over ``limit``: longer than allowed).

    Werkzeug cuts such a body off at the limit without a word, which would be answered as
    truncated JSON rather than 413.
    """
    stream = request.environ["wsgi.input"]
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    request.environ["wsgi.input"] = io.BytesIO(b"".join(chunks))
    return size


def _one_or_all(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values


def body_too_large(limit: int) -> BodyTooLarge:
    """The error of a body over ``limit`` bytes."""
    return BodyTooLarge(
        f"The request body is larger than {limit} bytes, the most this API accepts"
        " (MAX_CONTENT_LENGTH).",
    )


def init_app(app: Flask, *, max_content_length: int) -> None:
    """Parse ``app``'s JSON bodies here and check every request first (size, NUL in the URL)."""
    app.json = BodyJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = max_content_length
    app.before_request(_check_request)
