"""POST /v1/stripe/webhook: signatures, bad input, finding the org, and 5xx when the event cannot be
handed to Temporal. Real PostgreSQL, the dev server and FakeStripe; nothing mocked."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from billing.db.pool import open_pool
from billing.domain.ids import org_billing_id
from billing.testing import stripe_payloads as sp
from billing.testing.stripe_server import FakeStripe, sign_payload
from tests.conftest import API_TOKEN
from tests.webhook_support import T0, WEBHOOK_SECRET, customer_of, harness, paid_org, subscription_of


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


async def _workflow_exists(client: Client, org_id: str) -> bool:
    try:
        await client.get_workflow_handle(org_billing_id(org_id)).describe()
        return True
    except RPCError:
        return False


async def _event_rows(pool: AsyncConnectionPool, event_id: str) -> int:
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) AS n FROM stripe_webhook_events WHERE event_id = %s", [event_id]
            )
        ).fetchone()
    assert row is not None
    return int(row["n"])


async def test_bad_signatures_stale_timestamps_malformed_json_and_unknown_types_change_nothing(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool, plan="pro")
    failed = sp.invoice_event(
        "invoice.payment_failed",
        sp.invoice(
            customer_id=customer_of(org.id), organization_id=org.id, billing_reason="subscription_threshold"
        ),
        created=T0,
    )
    body = json.dumps(failed).encode()
    stale_at = int(time.time()) - 301
    async with harness(database_url, pool, client) as h:
        before = await h.billing_row(org.id)
        cases = {
            "missing": (await h.post(body, signature=""), 400, "missing Stripe-Signature header"),
            "wrong secret": (
                await h.post(body, signature=sign_payload(body, "whsec_other")),
                400,
                "bad Stripe-Signature: No signatures found matching the expected signature for payload",
            ),
            "tampered": (
                await h.post(
                    body.replace(b"subscription_threshold", b"subscription_cycle"),
                    signature=sign_payload(body, WEBHOOK_SECRET),
                ),
                400,
                "bad Stripe-Signature: No signatures found matching the expected signature for payload",
            ),
            "stale": (
                await h.post(body, signature=sign_payload(body, WEBHOOK_SECRET, stale_at)),
                400,
                f"bad Stripe-Signature: Timestamp outside the tolerance zone ({stale_at})",
            ),
            "malformed json": (await h.post(b'{"id": "evt_1", "type": '), 400, "body is not valid JSON"),
            "not an object": (await h.post(b"[1, 2]"), 400, "body is not a Stripe event object"),
            "no id": (
                await h.post({**failed, "id": None}),
                400,
                "malformed Stripe event: invoice.payment_failed event without an id",
            ),
        }
        for name, (response, status, msg) in cases.items():
            assert (name, response.status_code, response.json()) == (
                name,
                status,
                {"code": status, "error": "bad_request", "msg": msg},
            )
        unknown = sp.event("charge.refunded", {"id": "ch_1", "object": "charge"}, created=T0)
        response = await h.post(unknown)
        assert (response.status_code, response.json()) == (
            200,
            {"ok": True, "ignored": "unhandled event type 'charge.refunded'"},
        )
        assert await _event_rows(pool, failed["id"]) == 0
        assert await _event_rows(pool, unknown["id"]) == 0
        assert await h.billing_row(org.id) == before
        assert await h.flags(org.id) == set()
        assert await _workflow_exists(client, org.id) is False


async def test_without_a_webhook_secret_the_endpoint_answers_503(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    async with harness(database_url, pool, client, worker=False, STRIPE_WEBHOOK_SECRET=None) as h:  # type: ignore[arg-type]
        response = await h.post(b"{}", signature="t=1,v1=00")
    assert (response.status_code, response.json()) == (
        503,
        {
            "code": 503,
            "error": "unavailable",
            "msg": "STRIPE_WEBHOOK_SECRET is not set: webhooks are not accepted until it is",
        },
    )


async def test_the_org_is_found_by_metadata_customer_or_the_subscription_in_stripe(
    database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    by_customer = await paid_org(pool)
    by_stripe = await paid_org(pool)
    fake.add_customer("cus_unknown_1")
    fake.add_subscription(
        "cus_unknown_1", id=subscription_of(by_stripe.id), metadata={"organization_id": by_stripe.id}
    )
    async with harness(database_url, pool, client, fake=fake) as h:
        # No metadata: the customer's billing row names the org.
        e1 = sp.invoice_event(
            "invoice.payment_failed",
            sp.invoice(
                customer_id=customer_of(by_customer.id),
                organization_id=None,
                billing_reason="subscription_threshold",
            ),
            created=T0,
        )
        # Neither metadata nor a known customer: the subscription, retrieved from Stripe, names it.
        e2 = sp.invoice_event(
            "invoice.payment_failed",
            sp.invoice(
                customer_id="cus_unknown_1",
                subscription_id=subscription_of(by_stripe.id),
                organization_id=None,
                billing_reason="subscription_threshold",
            ),
            created=T0,
        )
        await h.deliver(e1)
        await h.deliver(e2)
        assert (await h.settle(by_customer.id)).payment_status == "blocked"
        assert (await h.settle(by_stripe.id)).payment_status == "blocked"
        assert fake.request_counts[f"/v1/subscriptions/{subscription_of(by_stripe.id)}"] == 1

        # No org anywhere: logged, recorded as unmatched, answered 200 (redelivering cannot help).
        nobody = sp.invoice_event(
            "invoice.payment_failed",
            sp.invoice(customer_id="cus_nobody", subscription_id="sub_nobody", organization_id="not-a-uuid"),
            created=T0,
        )
        response = await h.post(nobody)
        assert response.status_code == 200
        assert response.json()["ok"] is True
        assert response.json()["ignored"].startswith("no organization for invoice")
        assert (await h.webhook_rows(None))[nobody["id"]][0] == "unmatched"


async def test_503_when_postgres_or_temporal_cannot_take_the_event_and_a_redelivery_then_works(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool)
    failed = sp.invoice_event(
        "invoice.payment_failed",
        sp.invoice(
            customer_id=customer_of(org.id), organization_id=org.id, billing_reason="subscription_threshold"
        ),
        created=T0,
    )
    async with harness(database_url, pool, client) as h:
        # Temporal refuses (a namespace that does not exist): 503, Stripe will deliver again.
        lost = Client(
            client.service_client, namespace="no-such-namespace", data_converter=pydantic_data_converter
        )
        h.http._transport.app.state.client = lost  # type: ignore[attr-defined]
        response = await h.post(failed)
        assert response.status_code == 503
        assert response.json()["msg"].startswith(f"event {failed['id']} could not be handed over (Temporal:")
        assert (await h.webhook_rows(org.id))[failed["id"]] == ("received", None)

        # PostgreSQL gone: 503 too.
        doomed = await open_pool(database_url, max_size=1)
        await doomed.close()
        h.http._transport.app.state.pool = doomed  # type: ignore[attr-defined]
        h.http._transport.app.state.client = client  # type: ignore[attr-defined]
        response = await h.post(failed)
        assert response.status_code == 503
        assert (response.json()["code"], response.json()["error"]) == (503, "unavailable")
        assert response.json()["msg"].startswith(f"event {failed['id']} could not be "), response.json()
        assert "PostgreSQL" in response.json()["msg"], response.json()
        # Nothing was handed over: no workflow for the org, the event row as the first attempt left it.
        assert not await _workflow_exists(client, org.id)
        h.http._transport.app.state.pool = pool  # type: ignore[attr-defined]
        assert (await h.webhook_rows(org.id))[failed["id"]] == ("received", None)

        # The redelivery after the failed signal is signalled and applied.
        await h.deliver(failed)
        assert (await h.settle(org.id)).payment_status == "blocked"
        assert (await h.webhook_rows(org.id))[failed["id"]] == ("applied", "applied")
        # A redelivery of an applied event is answered at once.
        response = await h.post(failed)
        assert response.json() == {"ok": True, "duplicate": True, "workflow_id": org_billing_id(org.id)}


async def test_get_org_includes_the_payment_state(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool)
    inv = sp.invoice(
        customer_id=customer_of(org.id), organization_id=org.id, billing_reason="subscription_threshold"
    )
    async with harness(database_url, pool, client) as h:
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        assert (await h.http.get(f"/v1/orgs/{org.id}", headers=auth)).json()["payment_state"] is None
        await h.deliver(sp.invoice_event("invoice.payment_failed", inv, created=T0))
        await h.settle(org.id)
        body = (await h.http.get(f"/v1/orgs/{org.id}", headers=auth)).json()
    assert body["payment_status"] == "blocked"
    assert body["payment_state"]["payment_status"] == "blocked"
    assert [f["invoice_id"] for f in body["payment_state"]["failed_invoices"]] == [inv["id"]]
