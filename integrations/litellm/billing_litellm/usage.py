"""The usage object a usage event carries, taken from what LiteLLM got upstream. Pure.

Both shapes pass through as they came, reduced to the counts the billing service prices: Chat
Completions (``prompt_tokens``, ``completion_tokens`` and their ``*_details``) and the Responses
API (``input_tokens``, ``output_tokens`` and theirs). The billing service normalises and
validates them; nothing here adds or prices anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_SHAPES = (
    ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"),
    ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"),
)


def _as_mapping(value: Any) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        dumped = dump()
        return dumped if isinstance(dumped, Mapping) else None
    return None


def _count(value: Any) -> int | None:
    return value if type(value) is int else None


def usage_report(usage: Any) -> dict[str, Any] | None:
    """The usage object to report for ``usage`` (a dict or a pydantic model of either shape), or
    None when it holds no token counts."""
    data = _as_mapping(usage)
    if data is None:
        return None
    for inputs, outputs, input_details, output_details in _SHAPES:
        input_tokens, output_tokens = _count(data.get(inputs)), _count(data.get(outputs))
        if input_tokens is None and output_tokens is None:
            continue
        report: dict[str, Any] = {inputs: input_tokens or 0, outputs: output_tokens or 0}
        cached = _count((_as_mapping(data.get(input_details)) or {}).get("cached_tokens"))
        reasoning = _count((_as_mapping(data.get(output_details)) or {}).get("reasoning_tokens"))
        if cached is not None:
            report[input_details] = {"cached_tokens": cached}
        if reasoning is not None:
            report[output_details] = {"reasoning_tokens": reasoning}
        return report
    return None
