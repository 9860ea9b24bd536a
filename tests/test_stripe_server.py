"""Tests for FakeStripe, driven only through stripe-python, the way the production code talks to Stripe."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import stripe

from billing.testing.stripe_server import FakeStripe, sign_payload

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


def test_a_500_is_stored_under_its_key_and_replayed_until_the_key_expires(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.fail_next(1, status=500, path_prefix="/v1/billing/")
    opts: stripe.RequestOptions = {"idempotency_key": "k-500"}

    with pytest.raises(stripe.APIError) as exc_info:
        client.v1.billing.meter_events.create(_event(customer, 1, "f-1"), opts)
    assert exc_info.value.http_status == 500
    # As at Stripe, the 500 is the key's first result: a retry with the same key gets it again.
    for _ in range(2):
        with pytest.raises(stripe.APIError) as replayed:
            client.v1.billing.meter_events.create(_event(customer, 1, "f-1"), opts)
        assert replayed.value.http_status == 500
        assert replayed.value.headers is not None
        assert replayed.value.headers["Idempotent-Replayed"] == "true"
    assert fake.meter_events == []
    assert [(r.fault, r.replayed) for r in fake.requests] == [("fail", False), (None, True), (None, True)]

    # A new key executes the request.
    client.v1.billing.meter_events.create(_event(customer, 1, "f-1"), {"idempotency_key": "k-500-b"})
    assert fake.total(customer, "agent_tasks") == 1

    # 24 hours later the first key's stored 500 has expired; the identifier has too, so Stripe counts
    # the same identifier again (which is why a sender must not resend after its horizon).
    fake.advance(24 * 3600)
    client.v1.billing.meter_events.create(_event(customer, 1, "f-1"), opts)
    assert fake.total(customer, "agent_tasks") == 2


def test_a_refusal_in_front_of_the_api_is_not_stored(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.fail_next(1, status=429)
    opts: stripe.RequestOptions = {"idempotency_key": "k-429"}
    with pytest.raises(stripe.RateLimitError):
        client.v1.billing.meter_events.create(_event(customer, 1, "q-1"), opts)
    client.v1.billing.meter_events.create(_event(customer, 1, "q-1"), opts)
    assert fake.total(customer, "agent_tasks") == 1
    assert [r.replayed for r in fake.requests] == [False, False]


def test_stored_results_and_identifiers_expire_after_their_ttl(customer_fake: tuple[FakeStripe, str]) -> None:
    fake, customer = customer_fake
    client = stripe.StripeClient(API_KEY, base_addresses={"api": fake.url}, max_network_retries=0)
    opts: stripe.RequestOptions = {"idempotency_key": "ttl-key"}
    client.v1.billing.meter_events.create(_event(customer, 3, "ttl-1"), opts)
    fake.advance(59)
    replay = client.v1.billing.meter_events.create(_event(customer, 3, "ttl-1"), opts)
    assert replay.last_response is not None and replay.last_response.headers["Idempotent-Replayed"] == "true"
    with pytest.raises(stripe.InvalidRequestError) as exc_info:
        client.v1.billing.meter_events.create(_event(customer, 3, "ttl-1"))
    assert exc_info.value.code == "resource_already_exists"
    assert fake.total(customer, "agent_tasks") == 3

    fake.advance(1)  # both ttls (60 s here) have passed
    fresh = client.v1.billing.meter_events.create(_event(customer, 3, "ttl-1"), opts)
    assert fresh.last_response is not None and "Idempotent-Replayed" not in fresh.last_response.headers
    assert fake.total(customer, "agent_tasks") == 6


@pytest.fixture
def customer_fake() -> Iterator[tuple[FakeStripe, str]]:
    with FakeStripe(idempotency_ttl=60, identifier_ttl=60) as server:
        yield server, server.add_customer()


def test_a_second_request_with_a_key_in_use_gets_409(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.slow_next(1, 0.5, path_prefix="/v1/billing/meter_events")
    opts: stripe.RequestOptions = {"idempotency_key": "busy-key"}
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(client.v1.billing.meter_events.create, _event(customer, 2, "busy-1"), opts)
        assert fake.wait_key_in_use("busy-key")
        with pytest.raises(stripe.APIError) as exc_info:
            client.v1.billing.meter_events.create(_event(customer, 2, "busy-1"), opts)
        assert first.result().identifier == "busy-1"
    assert exc_info.value.http_status == 409
    # stripe-python 16 does not copy the code onto APIError; it is in the body.
    assert exc_info.value.json_body is not None
    assert exc_info.value.json_body["error"]["code"] == "idempotency_key_in_use"
    # The 409 is not stored: the next retry replays the first request's result.
    replay = client.v1.billing.meter_events.create(_event(customer, 2, "busy-1"), opts)
    assert replay.last_response is not None and replay.last_response.headers["Idempotent-Replayed"] == "true"
    assert fake.total(customer, "agent_tasks") == 2


def test_an_injected_409_is_key_in_use_and_not_stored(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.fail_next(1, status=409)
    opts: stripe.RequestOptions = {"idempotency_key": "k-409"}
    with pytest.raises(stripe.APIError) as exc_info:
        client.v1.billing.meter_events.create(_event(customer, 1, "c-1"), opts)
    assert exc_info.value.http_status == 409
    assert exc_info.value.json_body is not None
    assert exc_info.value.json_body["error"]["code"] == "idempotency_key_in_use"
    client.v1.billing.meter_events.create(_event(customer, 1, "c-1"), opts)
    assert fake.total(customer, "agent_tasks") == 1


def test_a_rotated_key_gets_401_and_a_restricted_key_403(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.set_api_key("sk_test_new")
    with pytest.raises(stripe.AuthenticationError) as exc_info:
        client.v1.billing.meter_events.create(_event(customer, 1, "k-1"))
    assert exc_info.value.http_status == 401
    fake.set_api_key(None)
    fake.forbid_key(API_KEY, path_prefix="/v1/billing/meter_events")
    with pytest.raises(stripe.PermissionError) as forbidden:
        client.v1.billing.meter_events.create(_event(customer, 1, "k-1"), {"idempotency_key": "k-403"})
    assert forbidden.value.http_status == 403
    assert client.v1.customers.retrieve(customer).id == customer  # other paths still allowed
    fake.allow_key(API_KEY)
    # Neither refusal was stored under the key.
    client.v1.billing.meter_events.create(_event(customer, 1, "k-1"), {"idempotency_key": "k-403"})
    assert fake.total(customer, "agent_tasks") == 1


def test_an_inactive_or_missing_meter_is_refused(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.deactivate_meter("agent_tasks")
    with pytest.raises(stripe.InvalidRequestError) as exc_info:
        client.v1.billing.meter_events.create(_event(customer, 1, "m-1"))
    assert "No active meter" in str(exc_info.value.user_message)
    fake.reactivate_meter("agent_tasks")
    client.v1.billing.meter_events.create(_event(customer, 1, "m-1"))
    fake.remove_meter("skill_blocks")
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meter_events.create(_event(customer, 1, "m-2") | {"event_name": "skill_blocks"})
    assert fake.total(customer, "agent_tasks") == 1


def test_meter_event_summaries_lag_when_asked_to(
    fake: FakeStripe, client: stripe.StripeClient, customer: str
) -> None:
    fake.set_summary_lag(120)
    start = _minute(int(time.time())) - 600
    client.v1.billing.meter_events.create(_event(customer, 5, "lag-1", timestamp=start + 5))
    meter_id = fake.meter_id("agent_tasks")

    def summed() -> int:
        page = client.v1.billing.meters.event_summaries.list(
            meter_id, {"customer": customer, "start_time": start, "end_time": start + 60}
        )
        return int(page.data[0].aggregated_value)

    assert summed() == 0
    fake.advance(120)
    assert summed() == 5


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


def test_a_payload_signed_with_several_secrets_verifies_with_either() -> None:
    payload = json.dumps({"id": "evt_2", "object": "event", "type": "invoice.paid", "data": {"object": {}}})
    header = sign_payload(payload, ["whsec_old", "whsec_new"])
    assert header.count("v1=") == 2
    for secret in ("whsec_old", "whsec_new"):
        assert stripe.Webhook.construct_event(payload, header, secret).id == "evt_2"
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, header, "whsec_other")


def test_meter_error_notifications_parse_and_fetch_through_stripe_python(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    body = fake.meter_error_notification(
        "agent_tasks", code="meter_event_customer_not_found", message="no customer", identifiers=["id-1"]
    )
    header = sign_payload(body, "whsec_meter")
    notification = client.parse_event_notification(body, header, "whsec_meter")
    assert notification.type == "v1.billing.meter.error_report_triggered"
    event = notification.fetch_event()
    error_type = event.data.reason.error_types[0]
    assert (error_type.code, error_type.error_count) == ("meter_event_customer_not_found", 1)
    assert error_type.sample_errors[0].request.identifier == "id-1"
    assert notification.related_object.id == fake.meter_id("agent_tasks")

    missing = fake.meter_error_notification("renamed", event_type="v1.billing.meter.no_meter_found",
                                            code="no_meter", identifiers=["id-2"])
    parsed = client.parse_event_notification(missing, sign_payload(missing, "whsec_meter"), "whsec_meter")
    assert parsed.type == "v1.billing.meter.no_meter_found"
    assert parsed.fetch_event().data.reason.error_types[0].code == "no_meter"
