"""What a request may cost, read from its route and body before it goes upstream. Pure.

- Which routes are billed (Chat Completions, Completions, the Responses API), which are free
  (the model list), and that every other route is refused to customer keys: a route this module
  does not know is never served unbilled.
- ``input_bytes``: the UTF-8 length of the request's text, an upper bound on the input tokens of
  a byte-level BPE tokenizer (each token covers at least one byte). Every key and scalar of the
  input fields counts, so role names, tool schemas and the JSON around them make up for the few
  tokens a chat template adds. Images, audio, video and files are not text: each such part is
  estimated at a fixed number of tokens, sent as ``input_tokens``.
- The output the client asked for (``max_completion_tokens`` / ``max_tokens`` /
  ``max_output_tokens``, times the ``n`` choices it asked for), and how the output the billing
  service granted is passed upstream (shared among the choices).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Api(enum.Enum):
    """A billed API: the fields its input lives in, and the one that caps its output."""

    CHAT = (("messages", "tools", "functions", "response_format"), "max_tokens")
    COMPLETIONS = (("prompt", "suffix"), "max_tokens")
    RESPONSES = (("input", "instructions", "tools", "text"), "max_output_tokens")

    @property
    def input_fields(self) -> tuple[str, ...]:
        fields: tuple[str, ...] = self.value[0]
        return fields

    @property
    def cap_field(self) -> str:
        field: str = self.value[1]
        return field


# The last path segments of each billed API, however LiteLLM's route spells the prefix
# (`/v1/...`, `/openai/deployments/{model}/...`, `/engines/{model}/...`).
_BILLED_SUFFIXES = (
    ("/chat/completions", Api.CHAT),
    ("/completions", Api.COMPLETIONS),
    ("/responses", Api.RESPONSES),
)
_FREE_ROUTES = frozenset({"/models", "/v1/models", "/model/info", "/v1/model/info"})
_FREE_PREFIXES = ("/models/", "/v1/models/")
# Content parts that are not text (Chat Completions and Responses API spellings).
MEDIA_PART_TYPES = frozenset(
    {
        "image_url",
        "input_image",
        "image",
        "input_audio",
        "audio",
        "file",
        "input_file",
        "video_url",
        "input_video",
    }
)


def billed_api(route: str) -> Api | None:
    """The billed API ``route`` serves, or None for a route that is not billed."""
    path = route.rstrip("/")
    for suffix, api in _BILLED_SUFFIXES:
        if path.endswith(suffix):
            return api
    return None


def is_free(route: str) -> bool:
    """True for the routes a customer key may call without a hold (listing models)."""
    path = route.rstrip("/")
    return path in _FREE_ROUTES or path.startswith(_FREE_PREFIXES)


@dataclass(frozen=True)
class InputEstimate:
    """``input_bytes`` of the text, and ``input_tokens`` for the parts that are not text."""

    input_bytes: int
    media_parts: int
    media_tokens: int

    @property
    def input_tokens(self) -> int:
        return self.media_parts * self.media_tokens


def estimate_input(body: Mapping[str, Any], api: Api, *, media_tokens: int) -> InputEstimate:
    """The input estimate of a request ``body`` to ``api``."""
    size = parts = 0
    for name in api.input_fields:
        if name in body:
            field_size, field_parts = _measure(body[name])
            size += len(name) + field_size
            parts += field_parts
    return InputEstimate(size, parts, media_tokens)


def _measure(value: Any) -> tuple[int, int]:
    """(UTF-8 bytes of every key and scalar, media parts) of a JSON value."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")), 0
    if isinstance(value, Mapping):
        if value.get("type") in MEDIA_PART_TYPES:
            return 0, 1
        size = parts = 0
        for key, item in value.items():
            item_size, item_parts = _measure(item)
            size += len(str(key).encode()) + item_size
            parts += item_parts
        return size, parts
    if isinstance(value, list | tuple):
        size = parts = 0
        for item in value:
            item_size, item_parts = _measure(item)
            size += item_size
            parts += item_parts
        return size, parts
    if value is None:
        return 0, 0
    return len(str(value)), 0


def _positive_int(value: Any) -> int | None:
    return value if type(value) is int and value >= 1 else None


def choices(body: Mapping[str, Any], api: Api) -> int:
    """How many completions the request makes (``n``; Completions' ``best_of`` too), each
    producing up to the per-choice maximum."""
    if api is Api.RESPONSES:
        return 1
    counts = [_positive_int(body.get(name)) or 1 for name in ("n", "best_of")]
    return max(counts) if api is Api.COMPLETIONS else counts[0]


def requested_output(body: Mapping[str, Any], api: Api) -> int | None:
    """The most output tokens the client asked for, all choices together; None when it set no
    maximum."""
    if api is Api.CHAT:
        per_choice = _positive_int(body.get("max_completion_tokens")) or _positive_int(
            body.get("max_tokens")
        )
    else:
        per_choice = _positive_int(body.get(api.cap_field))
    return None if per_choice is None else per_choice * choices(body, api)


def output_cap(body: Mapping[str, Any], api: Api, granted: int | None) -> dict[str, int]:
    """The fields to set on the upstream request so that all its choices together produce at
    most ``granted`` output tokens: empty when nothing was granted (no cap) or the client's own
    maximum is within it.

    Chat requests keep the field the client used (``max_completion_tokens`` or ``max_tokens``;
    ``max_tokens`` when it used none, which every OpenAI-compatible upstream reads).
    """
    if granted is None:
        return {}
    per_choice = max(1, granted // choices(body, api))
    fields = [api.cap_field]
    if api is Api.CHAT and "max_completion_tokens" in body:
        fields = ["max_completion_tokens"] + (["max_tokens"] if "max_tokens" in body else [])
    return {
        name: per_choice
        for name in fields
        if (current := _positive_int(body.get(name))) is None or current > per_choice
    }
