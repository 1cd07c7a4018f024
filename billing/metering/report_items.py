"""One item of a usage report, parsed and checked before anything is stored (DESIGN 4, 6.2).

Every check names the field it refuses, so a bad item is rejected on its own and never sinks
its batch: text with a NUL character anywhere (PostgreSQL cannot store it), an ``occurred_at``
without an offset, more than ``MAX_CLOCK_SKEW`` ahead or older than the configured age, an
unknown outcome, and whatever ``billing.catalog.usage`` refuses in the token counts.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from billing.catalog.usage import TokenCounts, normalise_usage, token_counts
from billing.core.errors import InvalidRequest

# How far ahead of our clock a reported occurred_at may be (clock skew between hosts).
MAX_CLOCK_SKEW = dt.timedelta(minutes=5)


class Outcome(enum.StrEnum):
    """How the upstream request ended. Usage is billed whatever the outcome."""

    COMPLETED = "completed"
    FAILED = "failed"
    CLIENT_DISCONNECTED = "client_disconnected"


@dataclass(frozen=True)
class Draft:
    """One reported item, parsed and checked; its key not yet resolved."""

    index: int
    request_id: str
    key_secret: str | None
    key_id: str | None
    model: str
    counts: TokenCounts
    usage_raw: Mapping[str, Any] | None
    occurred_at: dt.datetime | None
    outcome: Outcome


def _field(item: Mapping[str, Any], name: str, prefix: str) -> str | None:
    value = item.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise InvalidRequest(f"{prefix}{name} must be a non-empty string.", param=prefix + name)
    if "\x00" in value:
        raise InvalidRequest(f"{prefix}{name} contains a NUL character.", param=prefix + name)
    return value


# A NUL character as JSON writes it: "\u0000" after an even number of backslashes (an odd
# number would make it the literal text \u0000, which is fine).
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _refuse_nul(usage: Mapping[str, Any], param: str) -> None:
    """Refuse a usage object with a NUL character in any key or string, however deep: the raw
    report is stored as it came, and PostgreSQL cannot store NUL in text. Checked on the JSON
    text orjson writes (several times faster than walking the object in Python: ingest pays it
    per event)."""
    try:
        text = orjson.dumps(usage)
    except TypeError:  # an integer beyond 64 bits, which orjson refuses (see json_document)
        text = json.dumps(usage).encode()
    if b"\\u0000" in text and _JSON_NUL.search(text):
        raise InvalidRequest(f"{param} contains a NUL character.", param=param)


def parse_item(
    index: int, item: Any, prefix: str, *, max_age: dt.timedelta, now: dt.datetime
) -> Draft:
    """Item ``index`` of a usage report as a Draft; raises InvalidRequest (or InvalidUsage)
    naming the field, ``prefix`` (``events[i].``) before its name."""
    if not isinstance(item, Mapping):
        where = prefix.removesuffix(".")  # "events[3]", not "events[3]."
        raise InvalidRequest(f"{where or 'body'} must be a JSON object.", param=where or None)
    request_id = _field(item, "request_id", prefix)
    if request_id is None:
        raise InvalidRequest(f"{prefix}request_id is required.", param=prefix + "request_id")
    secret, key_id = _field(item, "api_key", prefix), _field(item, "key_id", prefix)
    if (secret is None) == (key_id is None):
        raise InvalidRequest(
            f"Send exactly one of {prefix}api_key and {prefix}key_id.", param=prefix + "api_key"
        )
    model = _field(item, "model", prefix)
    if model is None:
        raise InvalidRequest(f"{prefix}model is required.", param=prefix + "model")
    flat = [
        name
        for name in ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")
        if name in item
    ]
    usage = item.get("usage")
    if usage is not None and flat:
        raise InvalidRequest(
            f"Send either {prefix}usage or the token fields, not both.", param=prefix + "usage"
        )
    if usage is not None:
        if not isinstance(usage, Mapping):
            raise InvalidRequest(f"{prefix}usage must be a JSON object.", param=prefix + "usage")
        _refuse_nul(usage, prefix + "usage")
        counts = normalise_usage(usage, param=prefix + "usage")
    elif flat:
        counts = token_counts(
            item.get("input_tokens", 0),
            item.get("cached_tokens", 0),
            item.get("output_tokens", 0),
            item.get("reasoning_tokens", 0),
            param_prefix=prefix,
        )
    else:
        raise InvalidRequest(
            f"{prefix}usage (or input_tokens and output_tokens) is required.",
            param=prefix + "usage",
        )
    return Draft(
        index=index,
        request_id=request_id,
        key_secret=secret,
        key_id=key_id,
        model=model,
        counts=counts,
        usage_raw=usage,
        occurred_at=_occurred_at(item.get("occurred_at"), prefix, max_age=max_age, now=now),
        outcome=_outcome(item.get("outcome"), prefix),
    )


def _occurred_at(
    value: Any, prefix: str, *, max_age: dt.timedelta, now: dt.datetime
) -> dt.datetime | None:
    if value is None:
        return None
    param = prefix + "occurred_at"
    try:
        moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidRequest(
            f"{param} must be an RFC 3339 time with a UTC offset, such as 2026-11-22T10:00:00Z.",
            param=param,
        )
    if moment > now + MAX_CLOCK_SKEW:
        raise InvalidRequest(f"{param} is in the future.", param=param)
    if moment < now - max_age:
        # Also the years a UTC conversion would overflow (0001-01-01T00:00:00+01:00).
        raise InvalidRequest(
            f"{param} is more than {max_age.days} days in the past: usage that old is refused.",
            param=param,
        )
    return moment.astimezone(dt.UTC)


def _outcome(value: Any, prefix: str) -> Outcome:
    if value is None:
        return Outcome.COMPLETED
    try:
        return Outcome(value)
    except ValueError:
        choices = ", ".join(outcome.value for outcome in Outcome)
        raise InvalidRequest(
            f"{prefix}outcome must be one of {choices}.", param=prefix + "outcome"
        ) from None
