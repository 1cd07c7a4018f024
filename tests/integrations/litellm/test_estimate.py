"""billing_litellm.estimate: which routes are billed, the input bound, the output cap."""

from __future__ import annotations

from typing import Any

import pytest

from billing_litellm.estimate import (
    Api,
    billed_api,
    estimate_input,
    is_free,
    output_cap,
    requested_output,
)


@pytest.mark.parametrize(
    ("route", "api"),
    [
        ("/v1/chat/completions", Api.CHAT),
        ("/chat/completions", Api.CHAT),
        ("/openai/deployments/doubao-seed-2-0-mini/chat/completions", Api.CHAT),
        ("/engines/doubao-seed-2-0-mini/completions", Api.COMPLETIONS),
        ("/v1/completions", Api.COMPLETIONS),
        ("/v1/responses", Api.RESPONSES),
        ("/responses/", Api.RESPONSES),
        ("/v1/embeddings", None),
        ("/v1/responses/resp_1", None),
        ("/v1/models", None),
    ],
)
def test_billed_routes(route: str, api: Api | None) -> None:
    assert billed_api(route) is api


@pytest.mark.parametrize(
    ("route", "free"),
    [
        ("/v1/models", True),
        ("/models", True),
        ("/v1/models/doubao-seed-2-0-mini", True),
        ("/model/info", True),
        ("/v1/embeddings", False),
        ("/key/generate", False),
        ("/v1/chat/completions", False),
    ],
)
def test_free_routes(route: str, free: bool) -> None:
    assert is_free(route) is free


def test_input_bytes_count_every_key_and_string_of_the_input_fields_in_utf8() -> None:
    body = {
        "model": "doubao-seed-2-0-mini",
        "messages": [{"role": "user", "content": "Grüße"}],
        "temperature": 0.5,
    }
    estimate = estimate_input(body, Api.CHAT, media_tokens=1000)
    # "messages" + "role" + "user" + "content" + "Grüße" (7 bytes: ü and ß take two each)
    assert estimate.input_bytes == 8 + 4 + 4 + 7 + 7
    assert estimate.input_tokens == 0


def test_media_parts_are_estimated_in_tokens_not_counted_as_text() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 50_000}}
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image, image]}
        ]
    }
    estimate = estimate_input(body, Api.CHAT, media_tokens=1500)
    assert estimate.media_parts == 2
    assert estimate.input_tokens == 3000
    assert estimate.input_bytes < 100  # the base64 payload is not text


def test_responses_input_counts_instructions_and_tools_too() -> None:
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
    body = {"input": "hi", "instructions": "Be brief.", "tools": [tool], "max_output_tokens": 9}
    bare = estimate_input({"input": "hi"}, Api.RESPONSES, media_tokens=0).input_bytes
    full = estimate_input(body, Api.RESPONSES, media_tokens=0).input_bytes
    assert bare == len("input") + 2
    assert full > bare + len("Be brief.") + len("lookup")


def test_the_bound_is_above_what_a_byte_level_tokenizer_can_produce() -> None:
    text = "naïve café 日本語 " * 50
    body = {"messages": [{"role": "user", "content": text}]}
    # A byte-level BPE token covers one byte or more: never more tokens than bytes.
    assert estimate_input(body, Api.CHAT, media_tokens=0).input_bytes >= len(text.encode())


@pytest.mark.parametrize(
    ("body", "api", "requested"),
    [
        ({"max_tokens": 100}, Api.CHAT, 100),
        ({"max_completion_tokens": 50, "max_tokens": 100}, Api.CHAT, 50),
        ({}, Api.CHAT, None),
        ({"max_tokens": 0}, Api.CHAT, None),
        ({"max_tokens": True}, Api.CHAT, None),
        ({"max_tokens": "100"}, Api.CHAT, None),
        ({"max_output_tokens": 300}, Api.RESPONSES, 300),
        ({"max_tokens": 300}, Api.RESPONSES, None),
        ({"max_tokens": 7}, Api.COMPLETIONS, 7),
        ({"max_tokens": 100, "n": 3}, Api.CHAT, 300),  # every choice may use its maximum
        ({"max_tokens": 10, "n": 2, "best_of": 5}, Api.COMPLETIONS, 50),
        ({"max_tokens": 100, "n": 0}, Api.CHAT, 100),
    ],
)
def test_requested_output(body: dict[str, Any], api: Api, requested: int | None) -> None:
    assert requested_output(body, api) == requested


@pytest.mark.parametrize(
    ("body", "api", "granted", "cap"),
    [
        ({}, Api.CHAT, 812, {"max_tokens": 812}),
        ({"max_tokens": 100}, Api.CHAT, 812, {}),
        ({"max_tokens": 1000}, Api.CHAT, 812, {"max_tokens": 812}),
        ({"max_completion_tokens": 1000}, Api.CHAT, 812, {"max_completion_tokens": 812}),
        (
            {"max_completion_tokens": 1000, "max_tokens": 900},
            Api.CHAT,
            812,
            {"max_completion_tokens": 812, "max_tokens": 812},
        ),
        ({}, Api.RESPONSES, 256, {"max_output_tokens": 256}),
        ({}, Api.COMPLETIONS, 256, {"max_tokens": 256}),
        ({}, Api.CHAT, None, {}),  # a billing service before v2 grants no cap
        ({"n": 3}, Api.CHAT, 900, {"max_tokens": 300}),  # the grant is shared by the choices
        ({"max_tokens": 200, "n": 3}, Api.CHAT, 900, {}),
        ({"n": 4}, Api.CHAT, 2, {"max_tokens": 1}),
    ],
)
def test_output_cap(
    body: dict[str, Any], api: Api, granted: int | None, cap: dict[str, int]
) -> None:
    assert output_cap(body, api, granted) == cap
