"""The org-billing workflow under concurrency and failure: 100 concurrent deliveries, lost Stripe answers,
Stripe refusals, continue-as-new, and operator block/unblock through the CLI."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.core.config import Settings
from billing.domain.ids import org_billing_id
from billing.models.org_billing import OrgBillingInput, OrgBillingView
from billing.testing import stripe_payloads as sp
from billing.testing.stripe_server import FakeStripe
from tests.conftest import VENV_BIN
from tests.factories import Org
from tests.usage_support import ALL_TAGS
from tests.webhook_support import T0, Harness, customer_of, harness, paid_org, subscription_of
from workflows.org_billing import OrgBillingWorkflow

TAGS = ALL_TAGS  # every meter the migrations seed


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


def _scenario(org_id: str) -> list[dict[str, Any]]:
    """50 events over 20 invoices, metered and plan, some paid, some paid before they failed."""
    rng = random.Random(7)
    events = []
    for i in range(20):
        kind = "subscription_threshold" if i % 3 == 0 else "subscription_cycle"
        inv = sp.invoice(
            shape="old" if i % 2 else "new",
            invoice_id=f"in_{org_id[:8]}_{i:02d}",
            customer_id=customer_of(org_id),
            subscription_id=subscription_of(org_id),
            organization_id=org_id,
            billing_reason=kind,
            prices=[] if kind == "subscription_threshold" else None,
        )
        t = T0 + i * 100
        events.append(
            sp.invoice_event("invoice.payment_failed", inv, created=t, event_id=f"evt_{org_id[:8]}_{i}_f")
        )
        if i % 4 != 1:
            paid_at = t + rng.choice([5, 50])
            events.append(
                sp.invoice_event("invoice.paid", inv, created=paid_at, event_id=f"evt_{org_id[:8]}_{i}_p")
            )
    while len(events) < 50:  # a second failed attempt of some invoices, later
        i = len(events) % 20
        base = events[0]
        inv = {**base["data"]["object"], "id": f"in_{org_id[:8]}_{i:02d}", "attempt_count": 2}
        events.append(
            sp.invoice_event(
                "invoice.payment_failed", inv, created=T0 + i * 100 + 1, event_id=f"evt_{org_id[:8]}_{i}_f2"
            )
        )
    return events


def _essence(view: OrgBillingView) -> tuple[Any, ...]:
    return (
        view.plan,
        view.payment_status,
        view.pending_plan,
        sorted((f.invoice_id[-2:], f.kind, f.created) for f in view.failed_invoices),
    )


async def _row_essence(h: Harness, org: Org) -> tuple[Any, ...]:
    row = await h.billing_row(org.id)
    flags = {(org.project_ids.index(p), tag, reason) for p, tag, reason in await h.flags(org.id)}
    return row["plan"], row["pending_plan"], row["payment_status"], sorted(flags)


async def test_100_concurrent_deliveries_end_as_one_by_one(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    serial, concurrent = await paid_org(pool), await paid_org(pool)
    async with harness(database_url, pool, client) as h:
        for event in _scenario(serial.id):
            await h.deliver(event)
        expected = _essence(await h.settle(serial.id))

        deliveries = _scenario(concurrent.id) * 2
        random.Random(11).shuffle(deliveries)
        responses = await asyncio.gather(*(h.post(event) for event in deliveries))
        assert [r.status_code for r in responses] == [200] * 100
        h.delivered |= {event["id"] for event in deliveries}
        view = await h.settle(concurrent.id)
        assert _essence(view) == expected
        assert await _row_essence(h, concurrent) == await _row_essence(h, serial)
    # The scenario leaves both kinds of failure open: blocked, every tag of every project flagged.
    assert expected[1] == "blocked"
    assert {kind for _, kind, _ in expected[3]} == {"metered", "plan"}
    assert len(await h.flags(concurrent.id)) == 2 * len(TAGS)


async def test_a_lost_stripe_answer_is_retried_with_the_same_idempotency_key_and_applied_once(
    database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    org = await paid_org(pool)
    fake.add_customer(customer_of(org.id))
    fake.add_subscription(
        customer_of(org.id), id=subscription_of(org.id), items=[{"price": "p", "product": "prod"}]
    )
    sub_path = f"/v1/subscriptions/{subscription_of(org.id)}"
    inv = sp.invoice(
        shape="old",
        customer_id=customer_of(org.id),
        subscription_id=subscription_of(org.id),
        organization_id=org.id,
    )
    failed = sp.invoice_event("invoice.payment_failed", inv, created=T0)
    fake.drop_after_commit_next(1, path_prefix=sub_path)
    async with harness(database_url, pool, client, fake=fake) as h:
        await h.deliver(failed, times=3)
        view = await h.settle(org.id)
        await h.deliver(failed, times=2)  # redelivered after it was applied
        await h.settle(org.id)
    posts = [r for r in fake.requests if r.path == sub_path and r.method == "POST"]
    assert [(r.fault, r.replayed, r.idempotency_key) for r in posts] == [
        ("drop", False, f"downgrade:{failed['id']}"),
        (None, True, f"downgrade:{failed['id']}"),
    ]
    sub = fake.get_subscription(subscription_of(org.id))
    assert sub["cancel_at_period_end"] is True
    assert sub["metadata"] == {"downgrade_to": "free", "downgrade_reason": "plan_payment_failed"}
    assert (view.payment_status, view.pending_plan, view.last_stripe_refusal) == ("past_due", "free", None)


async def test_a_stripe_refusal_is_recorded_and_the_workflow_keeps_working(
    database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    org = await paid_org(pool)
    fake.add_customer(customer_of(org.id))
    fake.add_subscription(customer_of(org.id), id=subscription_of(org.id), status="canceled")
    inv = sp.invoice(
        shape="old",
        customer_id=customer_of(org.id),
        subscription_id=subscription_of(org.id),
        organization_id=org.id,
    )
    async with harness(database_url, pool, client, fake=fake) as h:
        await h.deliver(sp.invoice_event("invoice.payment_failed", inv, created=T0))
        view = await h.settle(org.id)
        assert view.payment_status == "past_due"
        assert view.last_stripe_refusal is not None
        assert (view.last_stripe_refusal.action, view.last_stripe_refusal.message) == (
            "downgrade",
            "HTTP 400: A canceled subscription can only update its cancellation_details and metadata.",
        )
        assert "Stripe refused downgrade" in (await h.billing_row(org.id))["payment_status_reason"]
        await h.deliver(sp.invoice_event("invoice.paid", inv, created=T0 + 10))
        view = await h.settle(org.id)
    assert (view.payment_status, view.pending_plan, view.failed_invoices) == ("ok", None, [])
    assert fake.request_counts[f"/v1/subscriptions/{subscription_of(org.id)}"] == 1


async def test_continue_as_new_keeps_the_state_and_every_queued_signal(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool)
    async with harness(database_url, pool, client) as h:
        handle = await client.start_workflow(
            OrgBillingWorkflow.run,
            OrgBillingInput(org_id=org.id, max_events_per_run=3),
            id=org_billing_id(org.id),
            task_queue=h.settings.task_queue,
        )
        events = _scenario(org.id)[:16]
        responses = await asyncio.gather(*(h.post(event) for event in events))
        assert {r.status_code for r in responses} == {200}
        h.delivered |= {event["id"] for event in events}
        view = await h.settle(org.id)
        # Compare with a workflow that never continues as new.
        other = await paid_org(pool)
        for event in _scenario(other.id)[:16]:
            await h.deliver(event)
        reference = await h.settle(other.id)
        described = await client.get_workflow_handle(org_billing_id(org.id)).describe()
    assert view.events_applied == 16
    assert view.run_events <= 3
    assert described.run_id != handle.first_execution_run_id
    assert _essence(view) == _essence(reference)
    # Concurrent deliveries arrive in any order (a payment before its failure makes that one stale),
    # but every event was processed, none lost across the runs.
    assert {e.id.split("_", 2)[2] for e in view.recent_events} == {
        e.id.split("_", 2)[2] for e in reference.recent_events
    }


def _billing(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "DATABASE_URL": settings.require_database_url(),
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "BILLING_TASK_QUEUE": settings.task_queue,
    }
    return subprocess.run(
        [str(VENV_BIN / "billing"), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_operator_block_and_unblock_with_the_cli_and_status_shows_the_state_machine(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    from tests.test_operator_enforced import quota_answers, slow_billing_write

    org = await paid_org(pool, plan="pro")
    inv = sp.invoice(customer_id=customer_of(org.id), organization_id=org.id, subscription_id=None)
    async with harness(database_url, pool, client) as h:
        await h.deliver(sp.invoice_event("invoice.payment_failed", inv, created=T0))
        await h.deliver(sp.invoice_event("invoice.paid", inv, created=T0 + 60))
        await h.settle(org.id)
        status = await asyncio.to_thread(_billing, h.settings, "status", org.id)
        assert status.returncode == 0, status.stderr
        assert f"payment state machine (org-billing/{org.id}): ok, plan pro" in status.stdout
        assert f"recent: invoice.payment_failed {h.delivered and sorted(h.delivered)[0]}" in status.stdout

        # The guarantee, not the timing: with every write of the billing row delayed 1.5 s, the row
        # and the flags are already committed when the command returns (issue 17, finding 2).
        async with slow_billing_write(pool, org.id, 1.5):
            blocked = await asyncio.to_thread(_billing, h.settings, "block", org.id, "--reason", "chargeback")
            assert blocked.returncode == 0, blocked.stderr
            assert "why: blocked by operator: chargeback" in blocked.stdout
            assert await quota_answers(h, org) == [403, 403]
            row = await h.billing_row(org.id)
            assert (row["payment_status"], row["payment_status_reason"]) == (
                "blocked",
                "blocked by operator: chargeback",
            )
            assert len(await h.flags(org.id)) == 2 * len(TAGS)

            unblocked = await asyncio.to_thread(
                _billing, h.settings, "unblock", org.id, "--reason", "resolved", "--json"
            )
            assert unblocked.returncode == 0, unblocked.stderr
            assert await quota_answers(h, org) == [200, 200]
            view = OrgBillingView.model_validate_json(unblocked.stdout)
            assert view.payment_status == "ok"
            assert [(a.action, a.reason) for a in view.operator_actions] == [
                ("block", "chargeback"),
                ("unblock", "resolved"),
            ]
            assert (await h.billing_row(org.id))["payment_status"] == "ok"
            assert await h.flags(org.id) == set()

    unknown = await asyncio.to_thread(
        _billing, h.settings, "block", "00000000-0000-0000-0000-000000000000", "--reason", "x"
    )
    assert (unknown.returncode, unknown.stderr) == (
        2,
        "billing: error: organization 00000000-0000-0000-0000-000000000000 does not exist\n",
    )
