"""Tests for FakeStripe, driven only through stripe-python, the way the production code talks to Stripe."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import stripe

from tests.stripe_server import FakeStripe, sign_payload

API_KEY = "sk_test_fake"


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient(API_KEY, base_addresses={"api": fake.url}, max_network_retries=0)


@pytest.fixture
def customer(fake: FakeStripe) -> str:
    return fake.add_customer()


def _minute(ts: int) -> int:
    return ts - ts % 60


def _event(customer: str, value: int | str, identifier: str, **extra: Any) -> dict[str, Any]:
    return {
        "event_name": "agent_tasks",
        "payload": {"stripe_customer_id": customer, "value": str(value)},
        "identifier": identifier,
        **extra,
    }


def test_meter_event_created_and_summarised(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    start = _minute(int(time.time())) - 600
    ev = client.v1.billing.meter_events.create(_event(customer, 3, "ev-1", timestamp=start + 5))
    client.v1.billing.meter_events.create(_event(customer, 4, "ev-2", timestamp=start + 65))
    # Outside the summarised window: counted, but not in the summary below.
    client.v1.billing.meter_events.create(_event(customer, 100, "ev-3", timestamp=start - 1))

    assert ev.object == "billing.meter_event"
    assert ev.identifier == "ev-1"
    assert ev.payload["value"] == "3"

    meter_id = fake.meter_id("agent_tasks")
    summaries = client.v1.billing.meters.event_summaries.list(
        meter_id, {"customer": customer, "start_time": start, "end_time": start + 120}
    )
    assert [s.aggregated_value for s in summaries.data] == [7]
    assert summaries.data[0].meter == meter_id

    meters = client.v1.billing.meters.list()
    assert {m.event_name for m in meters.data} == {
        "agent_tasks",
        "skill_blocks",
        "fast_skill_search",
        "agentic_skill_search",
        "storage_gb_hour",
    }
    assert all(m.status == "active" and m.id.startswith("mtr_") for m in meters.data)

    assert fake.total(customer, "agent_tasks") == 107
    assert [e["identifier"] for e in fake.meter_events] == ["ev-1", "ev-2", "ev-3"]
    assert fake.request_counts["/v1/billing/meter_events"] == 3
    # stripe-python sends form-encoded bracket notation; the fake decodes it back into nested params.
    first = fake.requests[0]
    assert first.headers["content-type"] == "application/x-www-form-urlencoded"
    assert first.params["payload"] == {"stripe_customer_id": customer, "value": "3"}


def test_decimal_values_sum_exactly(fake: FakeStripe, client: stripe.StripeClient, customer: str) -> None:
    for i, value in enumerate(["0.1", "0.2"]):
        client.v1.billing.meter_events.create(
            {"event_name": "storage_gb_hour", "payload": {"stripe_customer_id": customer, "value": value}}
            | {"identifier": f"s-{i}"}
        )
    assert fake.total(customer, "storage_gb_hour") == 0.3


def test_duplicate_identifier_is_rejected_and_not_counted(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    client.v1.billing.meter_events.create(_event(customer, 5, "dup-1"))

    with pytest.raises(stripe.InvalidRequestError) as exc_info:
        client.v1.billing.meter_events.create(_event(customer, 5, "dup-1"))

    err = exc_info.value
    assert err.http_status == 400
    assert err.code == "resource_already_exists"
    assert err.param == "identifier"
    assert "An event already exists with identifier dup-1" in str(err.user_message)
    assert err.headers is not None and err.headers["Stripe-Should-Retry"] == "false"
    assert fake.total(customer, "agent_tasks") == 5
    assert len(fake.meter_events) == 1


def test_idempotency_key_replays_the_first_answer(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    opts: stripe.RequestOptions = {"idempotency_key": "idem-1"}
    first = client.v1.billing.meter_events.create(_event(customer, 2, "idem-ev"), opts)
    second = client.v1.billing.meter_events.create(_event(customer, 2, "idem-ev"), opts)

    assert second.to_dict() == first.to_dict()
    assert second.last_response is not None and first.last_response is not None
    assert second.last_response.headers["Idempotent-Replayed"] == "true"
    assert second.last_response.request_id == first.last_response.request_id
    assert fake.total(customer, "agent_tasks") == 2
    assert [r.replayed for r in fake.requests] == [False, True]

    # Same key, different parameters: Stripe refuses rather than guessing.
    with pytest.raises(stripe.IdempotencyError) as exc_info:
        client.v1.billing.meter_events.create(_event(customer, 9, "idem-ev"), opts)
    assert exc_info.value.http_status == 400
    assert fake.total(customer, "agent_tasks") == 2


def test_idempotent_error_answers_are_replayed_too(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    client.v1.billing.meter_events.create(_event(customer, 1, "e-1"))
    opts: stripe.RequestOptions = {"idempotency_key": "idem-dup"}
    for _ in range(2):
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.billing.meter_events.create(_event(customer, 1, "e-1"), opts)
    assert fake.requests[-1].replayed


def test_concurrent_duplicates_count_once(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    def send(_: int) -> bool:
        try:
            client.v1.billing.meter_events.create(_event(customer, 1, "race-1"))
            return True
        except stripe.InvalidRequestError:
            return False

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(send, range(16)))

    assert outcomes.count(True) == 1
    assert fake.total(customer, "agent_tasks") == 1


def test_fail_next_500_surfaces_as_api_error_and_is_not_stored(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.fail_next(1, status=500, path_prefix="/v1/billing/")
    opts: stripe.RequestOptions = {"idempotency_key": "k-500"}

    with pytest.raises(stripe.APIError) as exc_info:
        client.v1.billing.meter_events.create(_event(customer, 1, "f-1"), opts)
    assert exc_info.value.http_status == 500
    assert fake.meter_events == []

    # The injected failure happened "in front of" the API, so the same key executes normally now.
    client.v1.billing.meter_events.create(_event(customer, 1, "f-1"), opts)
    assert fake.total(customer, "agent_tasks") == 1
    assert [r.fault for r in fake.requests] == ["fail", None]


def test_fail_next_429_surfaces_as_rate_limit_error(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.fail_next(2, status=429, retry_after=1)
    for _ in range(2):
        with pytest.raises(stripe.RateLimitError) as exc_info:
            client.v1.billing.meter_events.create(_event(customer, 1, "r-1"))
        err = exc_info.value
        assert err.http_status == 429
        # stripe-python 16 does not copy the code onto RateLimitError (err.code is None); it is in the body.
        assert err.json_body is not None and err.json_body["error"]["code"] == "rate_limit"
        assert err.headers is not None and err.headers["Retry-After"] == "1"

    client.v1.billing.meter_events.create(_event(customer, 1, "r-1"))
    assert fake.total(customer, "agent_tasks") == 1


def test_fail_next_respects_path_prefix(fake: FakeStripe, client: stripe.StripeClient, customer: str) -> None:
    fake.fail_next(1, status=503, path_prefix="/v1/subscriptions")
    client.v1.billing.meter_events.create(_event(customer, 1, "p-1"))  # not affected
    sub = fake.add_subscription(customer)
    with pytest.raises(stripe.APIError) as exc_info:
        client.v1.subscriptions.retrieve(sub["id"])
    assert exc_info.value.http_status == 503


def test_drop_after_commit_counts_once_and_retries_do_not_double_count(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.drop_after_commit_next(1)
    opts: stripe.RequestOptions = {"idempotency_key": "k-drop"}

    with pytest.raises(stripe.APIConnectionError):
        client.v1.billing.meter_events.create(_event(customer, 7, "drop-1"), opts)
    # The client saw nothing, yet Stripe committed the event.
    assert fake.total(customer, "agent_tasks") == 7
    assert fake.requests[-1].fault == "drop" and fake.requests[-1].status is None

    # Retry with the same Idempotency-Key: the stored answer is replayed.
    replay = client.v1.billing.meter_events.create(_event(customer, 7, "drop-1"), opts)
    assert replay.identifier == "drop-1"
    assert replay.last_response is not None
    assert replay.last_response.headers["Idempotent-Replayed"] == "true"

    # Retry with a fresh key but the same identifier: the meter event dedup rejects it.
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meter_events.create(_event(customer, 7, "drop-1"))

    assert fake.total(customer, "agent_tasks") == 7
    assert len(fake.meter_events) == 1


def test_stripe_python_retries_reuse_the_idempotency_key(fake: FakeStripe, customer: str) -> None:
    """With retries enabled, stripe-python resends a dropped POST with the same Idempotency-Key."""
    retrying = stripe.StripeClient(API_KEY, base_addresses={"api": fake.url}, max_network_retries=1)
    fake.drop_after_commit_next(1)

    ev = retrying.v1.billing.meter_events.create(_event(customer, 4, "retry-1"))

    assert ev.identifier == "retry-1"
    assert fake.total(customer, "agent_tasks") == 4
    first, second = fake.requests
    assert first.idempotency_key is not None
    assert first.idempotency_key == second.idempotency_key
    assert second.replayed


def test_default_stripe_client_does_not_retry(fake: FakeStripe, customer: str) -> None:
    """stripe-python 16: StripeClient without max_network_retries makes exactly one attempt."""
    default = stripe.StripeClient(API_KEY, base_addresses={"api": fake.url})
    fake.fail_next(1, status=500)
    with pytest.raises(stripe.APIError):
        default.v1.billing.meter_events.create(_event(customer, 1, "d-1"))
    assert len(fake.requests) == 1


def test_slow_request_times_out_client_side_but_still_commits(fake: FakeStripe, customer: str) -> None:
    impatient = stripe.StripeClient(
        API_KEY,
        base_addresses={"api": fake.url},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=0.2),
    )
    fake.slow_next(1, 0.5)
    with pytest.raises(stripe.APIConnectionError):
        impatient.v1.billing.meter_events.create(_event(customer, 2, "slow-1"))
    assert fake.wait_idle(timeout=5)
    assert fake.total(customer, "agent_tasks") == 2


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"event_name": "no_such_meter"}, "event_name"),
        ({"payload": {"stripe_customer_id": "cus_unknown", "value": "1"}}, "payload[stripe_customer_id]"),
        ({"timestamp": int(time.time()) - 36 * 24 * 3600}, "timestamp"),
        ({"timestamp": int(time.time()) + 3600}, "timestamp"),
        ({"identifier": "x" * 101}, "identifier"),
        ({"payload": {"stripe_customer_id": "CUSTOMER", "value": "abc"}}, "payload[value]"),
    ],
)
def test_meter_event_validation(
    fake: FakeStripe, client: stripe.StripeClient, customer: str, params: dict[str, Any], param: str
) -> None:
    body = _event(customer, 1, "v-1") | params
    if body["payload"].get("stripe_customer_id") == "CUSTOMER":
        body["payload"]["stripe_customer_id"] = customer
    with pytest.raises(stripe.InvalidRequestError) as exc_info:
        client.v1.billing.meter_events.create(body)
    assert exc_info.value.http_status == 400
    assert exc_info.value.param == param
    assert fake.meter_events == []


def test_meter_event_for_deleted_customer_is_rejected(fake: FakeStripe, client: stripe.StripeClient) -> None:
    gone = fake.add_customer(deleted=True)
    with pytest.raises(stripe.InvalidRequestError) as exc_info:
        client.v1.billing.meter_events.create(_event(gone, 1, "del-1"))
    assert exc_info.value.code == "resource_missing"
    assert f"No such customer: '{gone}'" in str(exc_info.value.user_message)
    assert client.v1.customers.retrieve(gone).deleted is True


def test_bad_api_key_is_rejected(fake: FakeStripe, customer: str) -> None:
    bad = stripe.StripeClient("pk_test_not_secret", base_addresses={"api": fake.url}, max_network_retries=0)
    with pytest.raises(stripe.AuthenticationError) as exc_info:
        bad.v1.billing.meter_events.create(_event(customer, 1, "a-1"))
    assert exc_info.value.http_status == 401
    assert fake.meter_events == []


def test_subscription_update_merges_metadata_and_sets_cancel_at_period_end(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    product = fake.add_product("Pro", metadata={"plan": "pro"})
    period_end = int(time.time()) + 10 * 24 * 3600
    seeded = fake.add_subscription(
        customer,
        items=[{"price": "price_pro", "product": product}],
        metadata={"plan": "pro", "keep": "yes", "drop": "me"},
        current_period_end=period_end,
    )

    sub = client.v1.subscriptions.update(
        seeded["id"],
        {"cancel_at_period_end": True, "metadata": {"downgrade_to": "free", "drop": ""}},
    )

    assert sub.cancel_at_period_end is True
    assert sub.cancel_at == period_end
    assert sub.metadata.to_dict() == {"plan": "pro", "keep": "yes", "downgrade_to": "free"}
    assert fake.requests[-1].params["metadata"] == {"downgrade_to": "free", "drop": ""}
    retrieved = client.v1.subscriptions.retrieve(seeded["id"])
    assert retrieved.to_dict() == sub.to_dict()
    assert retrieved["items"].data[0].price.product == product
    assert client.v1.products.retrieve(product).metadata["plan"] == "pro"

    undone = client.v1.subscriptions.update(seeded["id"], {"cancel_at_period_end": False})
    assert undone.cancel_at_period_end is False and undone.cancel_at is None


def test_updating_a_canceled_subscription_is_rejected(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    sub = fake.add_subscription(customer, status="canceled", metadata={"a": "1"})

    with pytest.raises(stripe.InvalidRequestError) as exc_info:
        client.v1.subscriptions.update(sub["id"], {"cancel_at_period_end": True, "metadata": {"b": "2"}})
    assert exc_info.value.http_status == 400
    assert "canceled subscription" in str(exc_info.value.user_message)
    assert fake.get_subscription(sub["id"])["metadata"] == {"a": "1"}

    # Stripe still lets you change metadata on a canceled subscription.
    updated = client.v1.subscriptions.update(sub["id"], {"metadata": {"b": "2"}})
    assert updated.metadata.to_dict() == {"a": "1", "b": "2"}


def test_unknown_objects_answer_404_resource_missing(fake: FakeStripe, client: stripe.StripeClient) -> None:
    for call in (
        lambda: client.v1.subscriptions.retrieve("sub_missing"),
        lambda: client.v1.products.retrieve("prod_missing"),
        lambda: client.v1.customers.retrieve("cus_missing"),
    ):
        with pytest.raises(stripe.InvalidRequestError) as exc_info:
            call()
        assert exc_info.value.http_status == 404
        assert exc_info.value.code == "resource_missing"


def test_signature_helper_verifies_with_stripe_python() -> None:
    secret = "whsec_test_secret"
    payload = json.dumps({"id": "evt_1", "object": "event", "type": "invoice.paid", "data": {"object": {}}})
    header = FakeStripe.sign_payload(payload.encode(), secret)

    event = stripe.Webhook.construct_event(payload, header, secret)
    assert event.id == "evt_1"
    assert stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=300)

    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload + " ", header, secret)
    stale = sign_payload(payload, secret, timestamp=int(time.time()) - 3600)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, stale, secret, tolerance=300)
