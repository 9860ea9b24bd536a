"""Routing by customer first (issue 11, finding 7): an event belongs to its customer's org; metadata
names the org only when no org has the customer, and then the org records the customer; a metadata
naming another org is a recorded mismatch; a livemode other than the key's is recorded as ignored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr
from temporalio.client import Client

from api.webhooks import key_livemode
from billing.core.clock import utcnow
from billing.core.config import Settings
from billing.domain.months import month_key
from billing.read.status import load_org_status
from billing.testing import stripe_payloads as sp
from billing.testing.stripe_server import FakeStripe
from tests.factories import make_org
from tests.report_support import counted_identifiers, outbox, queue_rows
from tests.test_webhooks import _workflow_exists
from tests.webhook_support import T0, customer_of, harness, paid_org


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


def metered_failure(
    customer_id: str, organization_id: str | None, invoice_id: str | None = None, **kwargs: object
) -> dict:
    inv = sp.invoice(
        shape="old",
        invoice_id=invoice_id,
        customer_id=customer_id,
        subscription_id=None,
        organization_id=organization_id,
        billing_reason="subscription_threshold",
    )
    return sp.invoice_event("invoice.payment_failed", inv, created=T0, **kwargs)  # type: ignore[arg-type]


async def test_an_event_whose_metadata_names_another_org_than_its_customers_is_a_recorded_mismatch(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org_a, org_b = await paid_org(pool), await paid_org(pool)
    event = metered_failure(customer_of(org_a.id), org_b.id)
    async with harness(database_url, pool, client) as h:
        response = await h.post(event)
        assert response.status_code == 200
        body = response.json()
        assert (body["ok"], body["status"]) == (True, "mismatch")
        detail = (
            f"metadata organization_id {org_b.id} names another org than {org_a.id}, whose Stripe "
            f"customer {customer_of(org_a.id)} this is: not applied"
        )
        assert body["ignored"] == detail
        assert await h.webhook_rows(org_a.id) == {event["id"]: ("mismatch", detail)}
        # A redelivery is answered the same way and still applies nothing.
        again = await h.post(event)
        assert (again.status_code, again.json()["status"]) == (200, "mismatch")
        for org in (org_a, org_b):
            assert (await h.billing_row(org.id))["payment_status"] == "ok"
            assert await h.flags(org.id) == set()
            assert not await _workflow_exists(client, org.id)
    status = await load_org_status(pool, org_a.id, month_key(utcnow()), stripe_configured=False)
    assert status is not None
    assert status.webhook_events_not_applied == [
        {
            "event_id": event["id"],
            "event_type": "invoice.payment_failed",
            "status": "mismatch",
            "detail": detail,
        }
    ]


async def test_the_customers_org_wins_over_metadata_and_metadata_routes_only_an_unknown_customer(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    known = await paid_org(pool)
    newcomer = await make_org(pool, plan="pro", projects=1)  # no Stripe customer yet
    async with harness(database_url, pool, client) as h:
        # Customer known, metadata agrees: its org.
        await h.deliver(metered_failure(customer_of(known.id), known.id))
        assert (await h.settle(known.id)).payment_status == "blocked"

        # Customer unknown: metadata names the org, which then records the customer.
        await h.deliver(metered_failure("cus_learned_1", newcomer.id, invoice_id="in_learned_1"))
        assert (await h.settle(newcomer.id)).payment_status == "blocked"
        async with pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT stripe_customer_id FROM organization_billing WHERE organization_id = %s",
                [newcomer.id],
            )
            assert await cursor.fetchone() == {"stripe_customer_id": "cus_learned_1"}

        # From then on the customer alone routes there, and metadata naming another org is a mismatch.
        paid = sp.invoice_event(
            "invoice.paid",
            sp.invoice(shape="old", invoice_id="in_learned_1", customer_id="cus_learned_1",
                       subscription_id=None, organization_id=None, billing_reason="subscription_threshold"),
            created=T0 + 10,
        )  # fmt: skip
        h.delivered.clear()
        await h.deliver(paid)
        view = await h.settle(newcomer.id)
        assert view.payment_status == "ok"
        mismatch = metered_failure("cus_learned_1", known.id, event_id="evt_routing_mismatch_1")
        assert (await h.post(mismatch)).json()["status"] == "mismatch"
        assert (await h.webhook_rows(newcomer.id))["evt_routing_mismatch_1"][0] == "mismatch"


async def test_an_event_of_the_other_mode_than_the_key_is_answered_200_and_recorded_as_ignored(
    database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    org = await paid_org(pool)
    live_event = {**metered_failure(customer_of(org.id), org.id), "livemode": True}
    async with harness(database_url, pool, client, fake=fake) as h:  # STRIPE_API_KEY sk_test_...
        response = await h.post(live_event)
        assert response.status_code == 200
        reason = "livemode true event, but STRIPE_API_KEY is a test key: not applied"
        assert response.json() == {"ok": True, "ignored": reason, "status": "ignored"}
        assert (await h.webhook_rows(None))[live_event["id"]] == ("ignored", reason)
        assert (await h.billing_row(org.id))["payment_status"] == "ok"
        assert not await _workflow_exists(client, org.id)
        # The same event in test mode is applied.
        await h.deliver({**live_event, "id": "evt_routing_testmode_1", "livemode": False})
        assert (await h.settle(org.id)).payment_status == "blocked"


@pytest.mark.parametrize(
    ("key", "live"),
    [
        ("sk_live_abc", True),
        ("rk_live_abc", True),
        ("sk_test_abc", False),
        ("rk_test_abc", False),
        ("whatever", None),
        (None, None),
    ],
)
def test_the_mode_of_the_stripe_key(key: str | None, live: bool | None) -> None:
    settings = Settings.model_construct(stripe_api_key=SecretStr(key) if key else None)
    assert key_livemode(settings) is live


async def test_overage_waiting_for_a_customer_goes_to_the_customer_a_webhook_teaches_the_org(
    database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    """Issue 9, finding 1: an org matched to Stripe by `metadata.organization_id` (no customer recorded)
    queues overage; it waits (never skipped), and once a webhook teaches the org its customer, the org's
    report is started at once and every unit reaches that customer, exactly once."""
    org = await make_org(pool, plan="pro", projects=1)  # matched by metadata only: no customer yet
    identifiers = await queue_rows(pool, org.id, [700, 50])
    customer = fake.add_customer()
    async with harness(database_url, pool, client, fake=fake) as h:
        await h.deliver(metered_failure(customer, org.id, invoice_id="in_learn_then_send"))
        await h.settle(org.id)
        deadline = time.monotonic() + 60
        while [row["status"] for row in await outbox(pool, org.id)] != ["sent", "sent"]:
            assert time.monotonic() < deadline, await outbox(pool, org.id)
            await asyncio.sleep(0.1)
    assert counted_identifiers(fake) == identifiers
    assert fake.total(customer, "agent_tasks") == 750


async def test_an_unmatched_event_redelivered_once_its_org_is_known_is_recorded_anew_and_applied(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await make_org(pool, plan="pro", projects=1)
    event = metered_failure("cus_routing_later_1", None)
    async with harness(database_url, pool, client) as h:
        first = await h.post(event)
        assert (first.status_code, first.json()["status"]) == (200, "unmatched")
        assert (await h.webhook_rows(None))[event["id"]][0] == "unmatched"
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE organization_billing SET stripe_customer_id = 'cus_routing_later_1'"
                " WHERE organization_id = %s",
                [org.id],
            )
        # Stripe's redelivery now routes to the org: the row is recorded anew for it, and applied.
        await h.deliver(event)
        assert (await h.settle(org.id)).payment_status == "blocked"
        assert (await h.webhook_rows(org.id))[event["id"]] == ("applied", "applied")
        assert event["id"] not in await h.webhook_rows(None)


async def test_concurrent_deliveries_of_one_event_are_all_answered_200_and_applied_once(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool)
    event = metered_failure(customer_of(org.id), org.id)
    async with harness(database_url, pool, client) as h:
        answers = await asyncio.gather(*(h.post(event) for _ in range(8)))
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
        assert all(a.json()["ok"] is True for a in answers)
        h.delivered.add(event["id"])
        view = await h.settle(org.id)
        assert view.payment_status == "blocked"
        assert view.events_applied >= 1
        assert await h.webhook_rows(org.id) == {event["id"]: ("applied", "applied")}
        # Once applied, a redelivery is answered at once as a duplicate.
        again = await h.post(event)
        assert again.json()["duplicate"] is True
