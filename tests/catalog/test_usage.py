"""Usage normalisation: both report shapes, and every way a report is refused."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.catalog.usage import (
    MAX_TOKENS,
    InvalidUsage,
    TokenCounts,
    _normalise_explaining,
    _plain_counts,
    normalise_usage,
    token_counts,
)
from billing.core.errors import InvalidRequest

# Seed 002, verbatim: output (230) already includes reasoning (211); 88 + 230 = 318.
SEED_002_RESPONSES: dict[str, Any] = {
    "input_tokens": 88,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 230,
    "output_tokens_details": {"reasoning_tokens": 211},
    "total_tokens": 318,
}
SEED_002_CHAT: dict[str, Any] = {
    "prompt_tokens": 88,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens": 230,
    "completion_tokens_details": {"reasoning_tokens": 211},
    "total_tokens": 318,
}
SEED_002_COUNTS = TokenCounts(
    input_tokens=88, cached_tokens=0, output_tokens=230, reasoning_tokens=211
)


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set to ``value``."""
    usage = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = usage
    for key in parents:
        node = node[key]
    node[leaf] = value
    return usage


def _rejects(usage: Any, param: str, *words: str) -> InvalidUsage:
    with pytest.raises(InvalidUsage) as info:
        normalise_usage(usage)
    error = info.value
    assert error.param == param
    assert param in error.message
    for word in words:
        assert word in error.message
    return error


# --- accepted shapes ---------------------------------------------------------------------------


def test_seed_002_responses_shape() -> None:
    assert normalise_usage(SEED_002_RESPONSES) == SEED_002_COUNTS


def test_seed_002_as_chat_completions_shape() -> None:
    assert normalise_usage(SEED_002_CHAT) == SEED_002_COUNTS


@pytest.mark.parametrize("base", [SEED_002_RESPONSES, SEED_002_CHAT], ids=["responses", "chat"])
def test_total_tokens_is_optional(base: dict[str, Any]) -> None:
    usage = copy.deepcopy(base)
    del usage["total_tokens"]
    assert normalise_usage(usage) == SEED_002_COUNTS
    assert normalise_usage({**usage, "total_tokens": None}) == SEED_002_COUNTS


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        pytest.param(
            {"prompt_tokens": 10, "completion_tokens": 5}, (10, 0, 5, 0), id="chat-absent"
        ),
        pytest.param(
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            (10, 0, 5, 0),
            id="chat-null",
        ),
        pytest.param(
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"audio_tokens": 3},
                "completion_tokens_details": {"reasoning_tokens": None},
            },
            (10, 0, 5, 0),
            id="chat-empty-subcounts",
        ),
        pytest.param(
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
            (10, 4, 5, 0),
            id="chat-partial-cached",
        ),
        pytest.param(
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "completion_tokens_details": {"reasoning_tokens": 2},
            },
            (10, 0, 5, 2),
            id="chat-partial-reasoning",
        ),
        pytest.param(
            {"input_tokens": 10, "output_tokens": 5}, (10, 0, 5, 0), id="responses-absent"
        ),
        pytest.param(
            {
                "input_tokens": 10,
                "output_tokens": 5,
                "input_tokens_details": None,
                "output_tokens_details": None,
            },
            (10, 0, 5, 0),
            id="responses-null",
        ),
        pytest.param(
            {"input_tokens": 10, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 10}},
            (10, 10, 5, 0),
            id="responses-all-cached",
        ),
        pytest.param(
            {"input_tokens": 10, "output_tokens": 5, "output_tokens_details": {}},
            (10, 0, 5, 0),
            id="responses-empty-details",
        ),
        pytest.param({"input_tokens": 0, "output_tokens": 0}, (0, 0, 0, 0), id="zeros"),
        pytest.param(
            {"input_tokens": MAX_TOKENS, "output_tokens": MAX_TOKENS},
            (MAX_TOKENS, 0, MAX_TOKENS, 0),
            id="at-the-limit",
        ),
    ],
)
def test_details_absent_null_or_partial(usage: dict[str, Any], expected: tuple[int, ...]) -> None:
    assert normalise_usage(usage) == TokenCounts(*expected)


def test_extra_keys_are_ignored() -> None:
    chat = {
        **SEED_002_CHAT,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 7},
        "completion_tokens_details": {
            "reasoning_tokens": 211,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 3,
            "rejected_prediction_tokens": 1,
        },
        "cost": "0.5",
        "anything": [1, 2.5, None],
    }
    assert normalise_usage(chat) == SEED_002_COUNTS
    responses = {**SEED_002_RESPONSES, "x_vendor": {"billed": 1.5}}
    assert normalise_usage(responses) == SEED_002_COUNTS


def test_null_keys_of_the_other_shape_are_not_a_mix() -> None:
    usage = {**SEED_002_CHAT, "input_tokens": None, "output_tokens_details": None}
    assert normalise_usage(usage) == SEED_002_COUNTS


def test_custom_param_root() -> None:
    usage = _with(SEED_002_CHAT, "prompt_tokens", -1)
    with pytest.raises(InvalidUsage) as info:
        normalise_usage(usage, param="events[2].usage")
    assert info.value.param == "events[2].usage.prompt_tokens"


def test_invalid_usage_is_an_invalid_request() -> None:
    assert issubclass(InvalidUsage, InvalidRequest)
    assert InvalidUsage.code == "invalid_usage"
    assert InvalidUsage.status == 400


# --- rejected counts ---------------------------------------------------------------------------

COUNT_PATHS = [
    "input_tokens",
    "input_tokens_details.cached_tokens",
    "output_tokens",
    "output_tokens_details.reasoning_tokens",
    "prompt_tokens",
    "prompt_tokens_details.cached_tokens",
    "completion_tokens",
    "completion_tokens_details.reasoning_tokens",
]


def _base_for(path: str) -> dict[str, Any]:
    return (
        SEED_002_CHAT
        if path.split(".")[0].startswith(("prompt", "completion"))
        else (SEED_002_RESPONSES)
    )


def _without_total(path: str) -> dict[str, Any]:
    usage = copy.deepcopy(_base_for(path))
    del usage["total_tokens"]
    return usage


@pytest.mark.parametrize("path", COUNT_PATHS)
@pytest.mark.parametrize(
    ("value", "words"),
    [
        pytest.param(-1, ("negative", "-1"), id="negative"),
        pytest.param(True, ("integer", "true"), id="bool-true"),
        pytest.param(False, ("integer", "false"), id="bool-false"),
        pytest.param(88.0, ("integer", "88.0"), id="integral-float"),
        pytest.param(0.5, ("integer", "0.5"), id="float"),
        pytest.param("88", ("integer", "string"), id="string"),
        pytest.param([88], ("integer", "array"), id="array"),
        pytest.param({"n": 88}, ("integer", "object"), id="object"),
        pytest.param(MAX_TOKENS + 1, ("exceeds", str(MAX_TOKENS + 1), str(MAX_TOKENS)), id="big"),
        pytest.param(10**5000, ("exceeds",), id="enormous"),
    ],
)
def test_bad_count_is_rejected_naming_the_field(path: str, value: Any, words: tuple[str]) -> None:
    _rejects(_with(_without_total(path), path, value), f"usage.{path}", *words)


@pytest.mark.parametrize("path", ["prompt_tokens", "completion_tokens", "input_tokens"])
def test_missing_or_null_main_count_is_rejected(path: str) -> None:
    usage = _without_total(path)
    _rejects(_with(usage, path, None), f"usage.{path}", "required")
    del usage[path]
    _rejects(usage, f"usage.{path}", "required")


@pytest.mark.parametrize(
    ("base", "whole", "part"),
    [
        (SEED_002_RESPONSES, "input_tokens", "input_tokens_details.cached_tokens"),
        (SEED_002_CHAT, "prompt_tokens", "prompt_tokens_details.cached_tokens"),
    ],
    ids=["responses", "chat"],
)
def test_cached_above_input_is_rejected(base: dict[str, Any], whole: str, part: str) -> None:
    error = _rejects(_with(base, part, 120), f"usage.{part}")
    assert error.message == f"usage.{part} (120) exceeds usage.{whole} (88)"


@pytest.mark.parametrize(
    ("base", "whole", "part"),
    [
        (SEED_002_RESPONSES, "output_tokens", "output_tokens_details.reasoning_tokens"),
        (SEED_002_CHAT, "completion_tokens", "completion_tokens_details.reasoning_tokens"),
    ],
    ids=["responses", "chat"],
)
def test_reasoning_above_output_is_rejected(base: dict[str, Any], whole: str, part: str) -> None:
    error = _rejects(_with(base, part, 231), f"usage.{part}")
    assert error.message == f"usage.{part} (231) exceeds usage.{whole} (230)"


def test_mixed_shapes_are_rejected() -> None:
    _rejects(
        {"prompt_tokens": 88, "output_tokens": 230},
        "usage",
        "prompt_tokens",
        "output_tokens",
        "mixes",
    )
    _rejects({**SEED_002_RESPONSES, "prompt_tokens_details": {"cached_tokens": 0}}, "usage")
    _rejects({**SEED_002_CHAT, "input_tokens": 88}, "usage")


@pytest.mark.parametrize(
    "usage",
    [
        {},
        {"total_tokens": 318},
        {"prompt_tokens": None, "completion_tokens": None},
        {"tokens": 318, "cached_tokens": 0},
    ],
)
def test_neither_shape_is_rejected(usage: dict[str, Any]) -> None:
    _rejects(usage, "usage", "neither", "prompt_tokens", "input_tokens")


@pytest.mark.parametrize("usage", [None, [], "usage", 318])
def test_usage_that_is_not_an_object_is_rejected(usage: Any) -> None:
    _rejects(usage, "usage", "object")


@pytest.mark.parametrize("base", [SEED_002_RESPONSES, SEED_002_CHAT], ids=["responses", "chat"])
def test_total_tokens_with_reasoning_added_on_top_is_rejected(base: dict[str, Any]) -> None:
    # 88 + 230 + 211: the mistake of counting reasoning on top of output.
    error = _rejects(_with(base, "total_tokens", 529), "usage.total_tokens", "529", "318")
    assert "reasoning" in error.message


@pytest.mark.parametrize("total", [317, 0, -318, 318.0, "318", True])
def test_total_tokens_mismatch_or_bad_type_is_rejected(total: Any) -> None:
    _rejects(_with(SEED_002_RESPONSES, "total_tokens", total), "usage.total_tokens")


@pytest.mark.parametrize(
    "details",
    [
        "input_tokens_details",
        "output_tokens_details",
        "prompt_tokens_details",
        "completion_tokens_details",
    ],
)
@pytest.mark.parametrize("value", [0, 5, "cached", [0], True, 0.0])
def test_details_that_are_not_an_object_are_rejected(details: str, value: Any) -> None:
    _rejects(_with(_base_for(details), details, value), f"usage.{details}", "object")


# --- flat counts -------------------------------------------------------------------------------


def test_token_counts_accepts_flat_counts() -> None:
    assert token_counts(88, 0, 230, 211) == SEED_002_COUNTS
    assert token_counts(5) == TokenCounts(5, 0, 0, 0)
    assert token_counts(
        input_tokens=10, cached_tokens=3, output_tokens=7, reasoning_tokens=7
    ) == TokenCounts(10, 3, 7, 7)


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"input_tokens": -5}, "input_tokens", ("negative",)),
        ({"input_tokens": 88.0}, "input_tokens", ("integer", "88.0")),
        ({"input_tokens": None}, "input_tokens", ("integer", "null")),
        ({"input_tokens": 1, "cached_tokens": True}, "cached_tokens", ("integer", "true")),
        ({"input_tokens": 1, "cached_tokens": 2}, "cached_tokens", ("exceeds", "input_tokens")),
        ({"input_tokens": 1, "output_tokens": "2"}, "output_tokens", ("integer", "string")),
        (
            {"input_tokens": 1, "output_tokens": MAX_TOKENS + 1},
            "output_tokens",
            ("exceeds", str(MAX_TOKENS)),
        ),
        (
            {"input_tokens": 1, "output_tokens": 2, "reasoning_tokens": 3},
            "reasoning_tokens",
            ("exceeds", "output_tokens (2)"),
        ),
    ],
)
@pytest.mark.parametrize("prefix", ["", "events[4]."])
def test_token_counts_rejects_with_prefixed_param(
    kwargs: dict[str, Any], field: str, words: tuple[str], prefix: str
) -> None:
    with pytest.raises(InvalidUsage) as info:
        token_counts(**kwargs, param_prefix=prefix)
    assert info.value.param == prefix + field
    assert info.value.message.startswith(prefix + field)
    for word in words:
        assert word in info.value.message


def test_token_counts_prefix_names_both_sides_of_a_subset_error() -> None:
    with pytest.raises(InvalidUsage) as info:
        token_counts(88, 120, 230, 211, param_prefix="usage.")
    assert info.value.param == "usage.cached_tokens"
    assert info.value.message == "usage.cached_tokens (120) exceeds usage.input_tokens (88)"


def test_token_counts_dataclass_is_always_valid() -> None:
    with pytest.raises(InvalidUsage) as info:
        TokenCounts(input_tokens=1, cached_tokens=2, output_tokens=0, reasoning_tokens=0)
    assert info.value.param == "cached_tokens"


# --- properties --------------------------------------------------------------------------------

_counts = (
    st.integers(0, MAX_TOKENS)
    .flatmap(lambda i: st.tuples(st.just(i), st.integers(0, i)))
    .flatmap(
        lambda ic: st.integers(0, MAX_TOKENS).flatmap(
            lambda o: st.tuples(st.just(ic), st.just(o), st.integers(0, o))
        )
    )
)


@given(_counts, st.booleans(), st.booleans())
def test_both_shapes_normalise_to_the_same_counts(
    counts: tuple[tuple[int, int], int, int], chat: bool, with_total: bool
) -> None:
    (inp, cached), out, reasoning = counts
    i, o = ("prompt", "completion") if chat else ("input", "output")
    usage: dict[str, Any] = {
        f"{i}_tokens": inp,
        f"{o}_tokens": out,
        f"{i}_tokens_details": {"cached_tokens": cached},
        f"{o}_tokens_details": {"reasoning_tokens": reasoning},
    }
    if with_total:
        usage["total_tokens"] = inp + out
    assert normalise_usage(usage) == TokenCounts(inp, cached, out, reasoning)
    assert token_counts(inp, cached, out, reasoning) == TokenCounts(inp, cached, out, reasoning)


_USAGE_KEYS = [
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "output_tokens_details",
    "total_tokens",
    "audio_tokens",
]
_COUNTS = st.one_of(
    st.none(), st.integers(-2, 300), st.integers(MAX_TOKENS - 1, MAX_TOKENS + 1), st.booleans()
)
_DETAILS = st.dictionaries(st.sampled_from(["cached_tokens", "reasoning_tokens"]), _COUNTS)
_VALUES = st.one_of(_COUNTS, st.floats(allow_nan=False), st.text(max_size=2), _DETAILS)


@given(st.dictionaries(st.sampled_from(_USAGE_KEYS), _VALUES))
def test_the_fast_path_never_disagrees_with_the_explaining_one(usage: dict[str, object]) -> None:
    fast = _plain_counts(usage)
    try:
        explained: TokenCounts | None = _normalise_explaining(usage, "usage")
    except InvalidUsage:
        explained = None
    if fast is not None:
        assert fast == explained
    if explained is not None:
        assert normalise_usage(usage) == explained
    else:
        with pytest.raises(InvalidUsage):
            normalise_usage(usage)


def test_the_fast_path_takes_the_seed_reports() -> None:
    assert _plain_counts(SEED_002_RESPONSES) == SEED_002_COUNTS
    assert _plain_counts(SEED_002_CHAT) == SEED_002_COUNTS
