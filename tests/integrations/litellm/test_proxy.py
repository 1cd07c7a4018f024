"""The LiteLLM integration end to end: the official ``openai`` SDK calls a real LiteLLM proxy
running ``billing_litellm``, in front of a fake upstream, billed by the real service.

Costs are checked against an independent Decimal computation from the seed prices and the usage
the SDK itself received. The tests under "Gateway contract v2" need the v2 server (clipped
holds, ``/keys/verify``, the rate limit in authorize's answer).
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integrations.litellm.conftest import Customer, Stack
from tests.integrations.litellm.stack import MASTER_KEY
from tests.integrations.litellm.upstream import FAIL_MARKER
from tests.reliability.conftest import rows, wait_until

MINI, LITE, CODE = "doubao-seed-2-0-mini", "doubao-seed-2-0-lite", "doubao-seed-2-0-code"
# Seed 000, USD per million tokens (input, output). The seed names no cached or reasoning
# price: DESIGN section 4 prices them at the input and output prices.
SEED_PRICES = {MINI: ("0.14", "0.69"), LITE: ("0.39", "1.99"), CODE: ("1.49", "6.99")}
HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a haiku about the ocean"}
]


def expected_nanos(model: str, counts: tuple[int, int, int, int]) -> int:
    """The cost of (input, cached, output, reasoning) tokens, rounded once, half-up, to 1e-9."""
    input_tokens, cached, output, reasoning = counts
    input_price, output_price = (Decimal(price) for price in SEED_PRICES[model])
    cached_price, reasoning_price = input_price, output_price
    usd = (
        (input_tokens - cached) * input_price
        + cached * cached_price
        + (output - reasoning) * output_price
        + reasoning * reasoning_price
    ) / 1_000_000
    return int((usd * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def usd(nanos: int) -> str:
    return f"{Decimal(nanos) / 10**9:.9f}"


def settled(stack: Stack, customer: Customer, count: int = 1) -> list[Any]:
    """The customer's usage events, once ``count`` of them are settled."""

    def ready() -> list[Any] | None:
        events = stack.events(customer.key_id)
        done = [event for event in events if event.status == "settled"]
        return events if len(done) >= count else None

    result: list[Any] = wait_until(ready, f"{count} usage events of {customer.key_id} settled")
    return result


def assert_charged(
    stack: Stack,
    customer: Customer,
    model: str,
    counts: tuple[int, int, int, int],
    *,
    credit_usd: str,
) -> None:
    """One event, with exactly the counts the client saw, charged exactly their seed price."""
    (event,) = settled(stack, customer)
    assert event.model == model
    assert event.outcome == "completed"
    assert event.request_id.startswith("litellm-")  # minted by the integration
    stored = (event.input_tokens, event.cached_tokens, event.output_tokens, event.reasoning_tokens)
    assert stored == counts
    cost = expected_nanos(model, counts)
    assert event.cost_nanos == cost
    account = stack.account(customer.account_id)
    assert account["balance_usd"] == usd(int(Decimal(credit_usd) * 10**9) - cost)
    assert account["held_usd"] == usd(0)


def test_a_chat_completion_is_charged_exactly(stack: Stack) -> None:
    customer = stack.customer("5.00")
    completion = stack.client(customer).chat.completions.create(model=MINI, messages=HELLO)

    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens_details and usage.completion_tokens_details
    counts = (
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens or 0,
        usage.completion_tokens,
        usage.completion_tokens_details.reasoning_tokens or 0,
    )
    assert counts[1] > 0 and counts[3] > 0  # both details reach the bill
    assert_charged(stack, customer, MINI, counts, credit_usd="5.00")


def test_a_streamed_chat_completion_is_charged_from_its_final_usage_chunk(stack: Stack) -> None:
    customer = stack.customer("5.00")
    chunks = list(
        stack.client(customer).chat.completions.create(
            model=LITE, messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )

    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.prompt_tokens_details and usage.completion_tokens_details
    counts = (
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens or 0,
        usage.completion_tokens,
        usage.completion_tokens_details.reasoning_tokens or 0,
    )
    assert_charged(stack, customer, LITE, counts, credit_usd="5.00")


def test_a_responses_api_call_is_charged_with_its_cached_and_reasoning_tokens(
    stack: Stack,
) -> None:
    customer = stack.customer("5.00")
    response = stack.client(customer).responses.create(
        model=CODE, input="Hallo, stellen Sie die neuen Funktionen von Doubao Seed 2.0 vor"
    )

    usage = response.usage
    assert usage is not None
    counts = (
        usage.input_tokens,
        usage.input_tokens_details.cached_tokens,
        usage.output_tokens,
        usage.output_tokens_details.reasoning_tokens,
    )
    assert counts[1] > 0 and counts[3] > 0
    assert_charged(stack, customer, CODE, counts, credit_usd="5.00")


def test_a_rate_limited_key_gets_429_with_retry_after(stack: Stack) -> None:
    customer = stack.customer("5.00", rate_limit="1 per 10 seconds")  # seed 000's limit
    client = stack.client(customer)
    client.chat.completions.create(model=MINI, messages=HELLO)

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MINI, messages=HELLO)

    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 10


def test_an_upstream_failure_releases_the_hold(stack: Stack) -> None:
    customer = stack.customer("5.00")
    failing: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": f"{FAIL_MARKER} Write a haiku"}
    ]

    with pytest.raises(openai.InternalServerError):
        stack.client(customer).chat.completions.create(model=MINI, messages=failing)

    # Without a release the hold would stay open for HOLD_TTL_SECONDS (10 minutes).
    wait_until(
        lambda: stack.account(customer.account_id)["held_usd"] == usd(0),
        "the failed request's hold released",
    )
    assert stack.account(customer.account_id)["balance_usd"] == "5.000000000"
    assert all(not event.cost_nanos for event in stack.events(customer.key_id))


def delivered(stack: Stack, key_id: str, state: str) -> list[int]:
    """The ids of the events telling that ``key_id`` went to ``state`` which the proxy has
    acknowledged, in order."""
    found = rows(
        stack.engine,
        "SELECT e.id FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id"
        " WHERE d.endpoint_id = :endpoint AND d.status = 'succeeded'"
        " AND e.payload->>'key_id' = :key_id"
        " AND coalesce(e.payload->>'state', e.payload->>'new_state') = :state ORDER BY e.id",
        endpoint=stack.webhook_endpoint_id,
        key_id=key_id,
        state=state,
    )
    return [event_id for (event_id,) in found]


def test_a_revoked_key_is_refused_from_the_cache_once_the_webhook_arrives(stack: Stack) -> None:
    customer = stack.customer("5.00")
    client = stack.client(customer)
    client.chat.completions.create(model=MINI, messages=HELLO)  # the proxy learns the key's id

    response = stack.billing.admin("POST", f"/keys/{customer.key_id}/revoke")
    assert response.status_code == 200, response.text
    wait_until(lambda: delivered(stack, customer.key_id, "revoked"), "the webhook")

    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=MINI, messages=HELLO)
    assert caught.value.code == "invalid_api_key"
    assert caught.value.response.headers["x-billing-decision"] == "key-state-cache"


def test_a_spent_key_is_refused_from_the_cache_until_a_top_up_reopens_it(stack: Stack) -> None:
    # $0.000005 holds one output token of a short prompt, but the request costs more: the
    # upstream bills reasoning beyond max_tokens, so settlement takes the balance below zero.
    customer = stack.customer("0.000005")
    client = stack.client(customer)
    short: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model=MINI, messages=short, max_tokens=1)
    settled(stack, customer)
    assert stack.account(customer.account_id)["balance_usd"].startswith("-")
    spent = wait_until(
        lambda: delivered(stack, customer.key_id, "insufficient_balance"), "the webhook"
    )

    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MINI, messages=short, max_tokens=1)
    assert caught.value.status_code == 402
    assert caught.value.code == "insufficient_balance"
    assert caught.value.response.headers["x-billing-decision"] == "key-state-cache"

    response = stack.billing.admin(
        "POST",
        f"/accounts/{customer.account_id}/adjustments",
        json={"amount_usd": "1.00", "reason": "top-up"},
        headers={"Idempotency-Key": f"top-up-{customer.key_id}"},
    )
    assert response.status_code == 201, response.text
    wait_until(
        lambda: max(delivered(stack, customer.key_id, "active"), default=0) > spent[-1],
        "the next webhook",
    )
    completion = client.chat.completions.create(model=MINI, messages=short, max_tokens=1)
    assert completion.usage is not None


def test_the_dashboard_billing_endpoints_pass_through_with_the_customer_key(
    stack: Stack,
) -> None:
    customer = stack.customer("5.00")
    stack.client(customer).chat.completions.create(model=MINI, messages=HELLO)
    settled(stack, customer)
    headers = {"Authorization": f"Bearer {customer.key}"}
    today = dt.datetime.now(dt.UTC).date()
    query = f"start_date={today}&end_date={today + dt.timedelta(days=1)}"
    for route in ("subscription", f"usage?{query}"):
        direct = httpx.get(f"{stack.billing.base}/v1/dashboard/billing/{route}", headers=headers)
        assert direct.status_code == 200, direct.text
        for prefix in ("/v1", ""):
            via = httpx.get(
                f"{stack.proxy.base}{prefix}/dashboard/billing/{route}", headers=headers
            )
            assert via.status_code == 200, via.text
            assert via.json() == direct.json()
    usage = httpx.get(f"{stack.proxy.base}/v1/dashboard/billing/usage?{query}", headers=headers)
    assert usage.json()["total_usage"] > 0  # in cents: the haiku above

    refused = httpx.get(
        f"{stack.proxy.base}/v1/dashboard/billing/subscription",
        headers={"Authorization": "Bearer sk-not-a-key"},
    )
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"


def test_routes_that_are_not_billed_are_refused_to_customer_keys(stack: Stack) -> None:
    customer = stack.customer("5.00")
    with pytest.raises(openai.NotFoundError) as caught:
        stack.client(customer).embeddings.create(model=MINI, input="free tokens?")
    assert caught.value.code == "unsupported_route"


def test_the_master_key_opens_litellms_own_routes_but_no_billed_one(stack: Stack) -> None:
    health = httpx.get(
        f"{stack.proxy.base}/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"}
    )
    assert health.status_code == 200, health.text
    admin = Customer("", "", MASTER_KEY)
    with pytest.raises(openai.AuthenticationError) as caught:
        stack.client(admin).chat.completions.create(model=MINI, messages=HELLO)
    assert caught.value.code == "invalid_api_key"


def test_a_request_naming_no_model_is_refused_before_billing(stack: Stack) -> None:
    customer = stack.customer("5.00")
    answer = httpx.post(
        f"{stack.proxy.base}/v1/chat/completions",
        json={"messages": HELLO},
        headers={"Authorization": f"Bearer {customer.key}"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "model"
    assert stack.events(customer.key_id) == []


def test_the_answer_names_the_billing_request_id(stack: Stack) -> None:
    customer = stack.customer("5.00")
    raw = stack.client(customer).chat.completions.with_raw_response.create(
        model=MINI, messages=HELLO
    )
    (event,) = settled(stack, customer)
    assert raw.headers["x-billing-request-id"] == event.request_id


def test_a_client_request_id_is_never_used_as_the_billing_request_id(stack: Stack) -> None:
    customer = stack.customer("5.00")
    client = stack.client(customer)
    for _ in range(2):
        client.chat.completions.create(
            model=MINI, messages=HELLO, extra_headers={"x-litellm-call-id": "chosen-by-client"}
        )
    events = settled(stack, customer, count=2)
    assert len({event.request_id for event in events}) == 2
    assert all("chosen-by-client" not in event.request_id for event in events)


# Gateway contract v2


def test_a_small_balance_is_served_with_clipped_max_tokens_until_spent(stack: Stack) -> None:
    customer = stack.customer("0.001")
    client = stack.client(customer)
    granted: list[int] = []
    max_tokens: int | None = None
    while True:
        try:
            client.chat.completions.create(
                model=MINI,
                messages=HELLO,
                max_tokens=openai.omit if max_tokens is None else max_tokens,
            )
        except openai.APIStatusError as refused:
            assert refused.status_code == 402, refused.body
            if refused.code == "insufficient_balance":
                break
            # Told the most it can afford, the client asks for that much.
            assert refused.code == "hold_exceeds_available" and refused.param == "max_output_tokens"
            assert isinstance(refused.body, dict)
            affordable = re.search(r"at most (\d+) output tokens", str(refused.body["message"]))
            assert affordable, refused.body
            max_tokens = int(affordable[1])
            assert max_tokens > 0
            continue
        sent = stack.upstream.bodies("/v1/chat/completions")[-1]
        granted.append(sent["max_tokens"])
        settled(stack, customer, count=len(granted))
        assert len(granted) < 20
    assert len(granted) >= 2
    assert granted == sorted(granted, reverse=True) and granted[0] < 32768  # clipped each time
    assert stack.account(customer.account_id)["balance_usd"].startswith("-")


def test_the_model_list_checks_the_key_without_a_hold(stack: Stack) -> None:
    customer = stack.customer("5.00")
    listed = {model.id for model in stack.client(customer).models.list()}
    assert {MINI, LITE, CODE} <= listed
    assert stack.account(customer.account_id)["held_usd"] == usd(0)

    broke = stack.customer("0")  # a 402 key may still list models
    assert {model.id for model in stack.client(broke).models.list()} == listed

    stranger = Customer(customer.account_id, customer.key_id, "sk-" + "x" * 48)
    with pytest.raises(openai.AuthenticationError) as caught:
        stack.client(stranger).models.list()
    assert caught.value.code == "invalid_api_key"


def test_the_answer_carries_the_keys_rate_limit(stack: Stack) -> None:
    customer = stack.customer("5.00", rate_limit="5 per minute")
    raw = stack.client(customer).chat.completions.with_raw_response.create(
        model=MINI, messages=HELLO
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "5"
    assert raw.headers["x-ratelimit-remaining-requests"] == "4"
