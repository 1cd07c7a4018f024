"""Token counts: one normalised, validated shape for both usage report formats.

A usage report arrives as a Chat Completions ``usage`` object (``prompt_tokens``,
``completion_tokens``, ``*_tokens_details``) or a Responses API one (``input_tokens``,
``output_tokens``, ``*_tokens_details``). Both carry the same four numbers: all input (cached
included), the cached subset, all output (reasoning included) and the reasoning subset. They are
normalised once, here, into :class:`TokenCounts`; nothing downstream looks at the raw shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from billing.core.errors import InvalidRequest

MAX_TOKENS: Final = 100_000_000
"""The most tokens any one count of one event may report; more is taken as a broken report."""

_CHAT: Final = (
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
)
_RESPONSES: Final = (
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "output_tokens_details",
)


class InvalidUsage(InvalidRequest):
    """A usage report breaks the token semantics; ``param`` is the field's full dotted path."""

    code = "invalid_usage"


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """One event's tokens: all input (cached included) and all output (reasoning included)."""

    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int

    def __post_init__(self) -> None:
        # Pricing relies on every TokenCounts being valid, however it was built. The plain case
        # is checked in one expression; anything else goes through the checks that explain.
        i, c, o, r = (
            self.input_tokens,
            self.cached_tokens,
            self.output_tokens,
            self.reasoning_tokens,
        )
        plain = type(i) is int and type(c) is int and type(o) is int and type(r) is int
        if plain and 0 <= c <= i <= MAX_TOKENS and 0 <= r <= o <= MAX_TOKENS:
            return
        _validated(
            ("input_tokens", self.input_tokens),
            ("cached_tokens", self.cached_tokens),
            ("output_tokens", self.output_tokens),
            ("reasoning_tokens", self.reasoning_tokens),
        )


def token_counts(
    input_tokens: object,
    cached_tokens: object = 0,
    output_tokens: object = 0,
    reasoning_tokens: object = 0,
    *,
    param_prefix: str = "",
) -> TokenCounts:
    """Validate flat, already-normalised counts; raises InvalidUsage, param = prefix + field."""
    return TokenCounts(
        *_validated(
            (param_prefix + "input_tokens", input_tokens),
            (param_prefix + "cached_tokens", cached_tokens),
            (param_prefix + "output_tokens", output_tokens),
            (param_prefix + "reasoning_tokens", reasoning_tokens),
        )
    )


def normalise_usage(usage: Mapping[str, object], *, param: str = "usage") -> TokenCounts:
    """Normalise a Chat Completions or Responses API usage object; raises InvalidUsage on misuse."""
    return _plain_counts(usage) or _normalise_explaining(usage, param)


def _plain_counts(usage: object) -> TokenCounts | None:
    """The counts of a well-formed report, cheaply; None for anything else (even if valid).

    Ingest normalises every event, so the common case must be fast. Whatever this returns,
    :func:`_normalise_explaining` would return too; whatever it declines, that function judges
    and explains.
    """
    if type(usage) is not dict:
        return None
    get = usage.get
    responses = get("input_tokens"), get("output_tokens")
    responses_details = get("input_tokens_details"), get("output_tokens_details")
    chat = get("prompt_tokens"), get("completion_tokens")
    chat_details = get("prompt_tokens_details"), get("completion_tokens_details")
    if chat == (None, None) and chat_details == (None, None):
        (inp, out), (inp_details, out_details) = responses, responses_details
    elif responses == (None, None) and responses_details == (None, None):
        (inp, out), (inp_details, out_details) = chat, chat_details
    else:
        return None
    cached = reasoning = None
    if inp_details is not None:
        if type(inp_details) is not dict:
            return None
        cached = inp_details.get("cached_tokens")
    if out_details is not None:
        if type(out_details) is not dict:
            return None
        reasoning = out_details.get("reasoning_tokens")
    cached = 0 if cached is None else cached
    reasoning = 0 if reasoning is None else reasoning
    total = get("total_tokens")
    if type(inp) is not int or type(out) is not int:
        return None
    if total is not None and (type(total) is not int or total != inp + out):
        return None
    if type(cached) is not int or type(reasoning) is not int:
        return None
    if not (0 <= cached <= inp <= MAX_TOKENS and 0 <= reasoning <= out <= MAX_TOKENS):
        return None
    return TokenCounts(inp, cached, out, reasoning)


def _normalise_explaining(usage: Mapping[str, object], param: str) -> TokenCounts:
    if not isinstance(usage, Mapping):
        raise InvalidUsage(f"{param} must be an object, got {_describe(usage)}", param=param)
    # A null key carries no information, so it does not count towards either shape.
    chat = [key for key in _CHAT if usage.get(key) is not None]
    responses = [key for key in _RESPONSES if usage.get(key) is not None]
    if chat and responses:
        raise InvalidUsage(
            f"{param} mixes Chat Completions fields ({', '.join(chat)}) with Responses API fields "
            f"({', '.join(responses)}); send one shape",
            param=param,
        )
    if not chat and not responses:
        raise InvalidUsage(
            f"{param} has neither prompt_tokens/completion_tokens (Chat Completions) nor "
            "input_tokens/output_tokens (Responses API)",
            param=param,
        )
    input_key, output_key, input_details, output_details = _CHAT if chat else _RESPONSES

    input_param = f"{param}.{input_key}"
    output_param = f"{param}.{output_key}"
    cached_param = f"{param}.{input_details}.cached_tokens"
    reasoning_param = f"{param}.{output_details}.reasoning_tokens"
    input_tokens = _required(usage, input_key, input_param)
    output_tokens = _required(usage, output_key, output_param)
    cached_tokens = _sub_count(usage, input_details, "cached_tokens", f"{param}.{input_details}")
    reasoning_tokens = _sub_count(
        usage, output_details, "reasoning_tokens", f"{param}.{output_details}"
    )
    counts = TokenCounts(
        *_validated(
            (input_param, input_tokens),
            (cached_param, cached_tokens),
            (output_param, output_tokens),
            (reasoning_param, reasoning_tokens),
        )
    )

    total = usage.get("total_tokens")
    if total is not None:
        total_param = f"{param}.total_tokens"
        total = _integer(total_param, total)
        # A mismatch almost always means reasoning was added on top of output, which would
        # double-bill it; refuse rather than guess which number is right.
        expected = counts.input_tokens + counts.output_tokens
        if total != expected:
            raise InvalidUsage(
                f"{total_param} ({_show(total)}) is not {input_param} + {output_param} "
                f"({counts.input_tokens} + {counts.output_tokens} = {expected}); "
                "output must already include reasoning",
                param=total_param,
            )
    return counts


def _required(usage: Mapping[str, object], key: str, param: str) -> object:
    value = usage.get(key)
    if value is None:
        raise InvalidUsage(f"{param} is required", param=param)
    return value


def _sub_count(usage: Mapping[str, object], details_key: str, key: str, param: str) -> object:
    details = usage.get(details_key)
    if details is None:
        return 0
    if not isinstance(details, Mapping):
        raise InvalidUsage(
            f"{param} must be an object or null, got {_describe(details)}", param=param
        )
    value = details.get(key)
    return 0 if value is None else value


def _validated(
    input_tokens: tuple[str, object],
    cached_tokens: tuple[str, object],
    output_tokens: tuple[str, object],
    reasoning_tokens: tuple[str, object],
) -> tuple[int, int, int, int]:
    inp, cached, out, reasoning = (
        _count(param, value)
        for param, value in (input_tokens, cached_tokens, output_tokens, reasoning_tokens)
    )
    for whole_param, whole, part_param, part in (
        (input_tokens[0], inp, cached_tokens[0], cached),
        (output_tokens[0], out, reasoning_tokens[0], reasoning),
    ):
        if part > whole:
            raise InvalidUsage(
                f"{part_param} ({part}) exceeds {whole_param} ({whole})", param=part_param
            )
    return inp, cached, out, reasoning


def _count(param: str, value: object) -> int:
    value = _integer(param, value)
    if value < 0:
        raise InvalidUsage(f"{param} must not be negative, got {_show(value)}", param=param)
    if value > MAX_TOKENS:
        raise InvalidUsage(
            f"{param} ({_show(value)}) exceeds the limit of {MAX_TOKENS} tokens per event",
            param=param,
        )
    return value


def _integer(param: str, value: object) -> int:
    # bool is an int subclass, and an integral float (88.0) is still a float: both are refused
    # so that a sloppy producer is caught instead of silently coerced.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidUsage(
            f"{param} must be an integer number of tokens, got {_describe(value)}", param=param
        )
    return value


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return _show(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _show(value: int) -> str:
    # str() of a huge int is slow and, past 4300 digits, raises; the message need not echo it.
    return str(value) if abs(value) < 10**30 else ("-" if value < 0 else "") + "10**30 or more"
