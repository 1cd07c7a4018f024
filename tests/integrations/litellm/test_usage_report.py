"""billing_litellm.usage: the usage object sent to the billing service, in the shape it came."""

from __future__ import annotations

from typing import Any

from litellm.types.llms.openai import ResponseAPIUsage
from litellm.types.utils import Usage

from billing_litellm.usage import usage_report

# Seed 002's Responses API usage.
SEED_002 = {
    "input_tokens": 88,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 230,
    "output_tokens_details": {"reasoning_tokens": 211},
    "total_tokens": 318,
}


def test_a_responses_api_usage_keeps_its_shape_and_details() -> None:
    assert usage_report(ResponseAPIUsage.model_validate(SEED_002)) == {
        "input_tokens": 88,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 230,
        "output_tokens_details": {"reasoning_tokens": 211},
    }


def test_litellms_chat_usage_is_reduced_to_the_counts_that_are_priced() -> None:
    usage = Usage(
        prompt_tokens=120,
        completion_tokens=64,
        total_tokens=184,
        prompt_tokens_details={"cached_tokens": 40, "audio_tokens": 3},
        completion_tokens_details={"reasoning_tokens": 16},
    )
    assert usage_report(usage) == {
        "prompt_tokens": 120,
        "completion_tokens": 64,
        "prompt_tokens_details": {"cached_tokens": 40},
        "completion_tokens_details": {"reasoning_tokens": 16},
    }


def test_a_plain_dict_without_details_is_reported_without_them() -> None:
    assert usage_report({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}) == {
        "prompt_tokens": 5,
        "completion_tokens": 7,
    }


def test_nothing_to_report_without_counts() -> None:
    nothing: list[Any] = [None, {}, {"total_tokens": 12}, "12 tokens", {"prompt_tokens": "5"}]
    assert [usage_report(value) for value in nothing] == [None] * len(nothing)
