"""What one Stripe event costs the org-billing workflow (issue 14, ONE_WRITE_PER_DRAIN): an event applied
alone is one activity (one PostgreSQL transaction: billing row, quota flags and the event's `applied`
mark) and two workflow tasks; a burst already queued when a workflow task runs is written once, with
the burst's final state, and every event of it marked with what became of it."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHandle

from billing.domain.ids import org_billing_id
from billing.testing import stripe_payloads as sp
from tests.conftest import running_worker
from tests.factories import Org
from tests.usage_support import ALL_TAGS
from tests.webhook_support import T0, customer_of, harness, paid_org, subscription_of
from workflows.org_billing import ONE_WRITE_PER_DRAIN

TAGS = ALL_TAGS  # every meter the migrations seed


def _metered_invoice(org: Org, n: int) -> dict[str, Any]:
    return sp.invoice(
        shape="old",
        invoice_id=f"in_{org.id[:8]}_{n}",
        customer_id=customer_of(org.id),
        subscription_id=subscription_of(org.id),
        organization_id=org.id,
        billing_reason="subscription_threshold",
    )


async def _history(handle: WorkflowHandle[Any, Any]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads((await handle.fetch_history()).to_json())["events"]
    return events


def _payload(payloads: dict[str, Any]) -> Any:
    """The first payload of a history's ``payloads`` (JSON, base64 in the history's JSON form)."""
    return json.loads(base64.b64decode(payloads["payloads"][0]["data"]))


def _patch_id(marker: dict[str, Any]) -> str:
    patch_id: str = _payload(marker["markerRecordedEventAttributes"]["details"]["patch-data"])["id"]
    return patch_id


def _costs(events: list[dict[str, Any]]) -> tuple[int, Counter[str]]:
    """Workflow tasks completed, and activities scheduled by type."""
    tasks = sum(1 for e in events if e["eventType"] == "EVENT_TYPE_WORKFLOW_TASK_COMPLETED")
    activities = Counter(
        e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        for e in events
        if "activityTaskScheduledEventAttributes" in e
    )
    return tasks, activities


def _upserts(events: list[dict[str, Any]]) -> int:
    return sum(1 for e in events if e["eventType"] == "EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES")


async def _idle(handle: WorkflowHandle[Any, Any]) -> list[dict[str, Any]]:
    """The history once the workflow waits for signals: its last workflow task completed, no activity
    pending (so the next signal gets a workflow task of its own)."""
    for _ in range(600):
        events = await _history(handle)
        if (
            events[-1]["eventType"]
            in (
                "EVENT_TYPE_WORKFLOW_TASK_COMPLETED",
                "EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",
            )
            and not (await handle.describe()).raw_description.pending_activities
        ):
            return events
        await asyncio.sleep(0.05)
    raise AssertionError("the org workflow did not go idle")


async def test_an_event_applied_alone_costs_one_activity_and_two_workflow_tasks(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool, plan="pro", projects=2)
    async with harness(database_url, pool, client) as h:
        handle = client.get_workflow_handle(org_billing_id(org.id))
        await h.deliver(sp.invoice_event("invoice.payment_failed", _metered_invoice(org, 0), created=T0))
        await h.settle(org.id)
        idle = await _idle(handle)
        before, upserts_before = _costs(idle), _upserts(idle)
        pairs = 5
        for i in range(1, pairs + 1):
            # Each flips the org's status (ok, then blocked again): each is written, alone.
            paid = sp.invoice_event("invoice.paid", _metered_invoice(org, i - 1), created=T0 + 10 * i)
            failed = sp.invoice_event(
                "invoice.payment_failed", _metered_invoice(org, i), created=T0 + 10 * i + 1
            )
            for payload in (paid, failed):
                await h.deliver(payload)
                await h.settle(org.id)
                await _idle(handle)
        idle = await _idle(handle)
        after, upserts_after = _costs(idle), _upserts(idle)
        rows = await h.webhook_rows(org.id)
        billing_row = await h.billing_row(org.id)
        flags = await h.flags(org.id)
    events = 2 * pairs
    assert after[0] - before[0] == 2 * events
    assert after[1] - before[1] == Counter({"sync_org_billing": events})
    assert upserts_after - upserts_before == events  # PaymentStatus, which every one of them changes
    assert set(rows.values()) == {("applied", "applied")} and len(rows) == events + 1
    assert billing_row["payment_status"] == "blocked"
    assert {(p, t) for p, t, _ in flags} == {(p, t) for p in org.project_ids for t in TAGS}


async def test_a_queued_burst_is_written_once_with_its_final_state(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool, plan="pro", projects=2)
    invoices = [_metered_invoice(org, i) for i in range(4)]
    burst = [
        sp.invoice_event(
            kind, invoice, created=T0 + 10 * i + offset, event_id=f"evt_{org.id[:8]}_{i}_{offset}"
        )
        for i, invoice in enumerate(invoices)
        for offset, kind in enumerate(("invoice.payment_failed", "invoice.paid"))
    ]
    # The last invoice fails again: the burst ends blocked.
    burst.append(
        sp.invoice_event("invoice.payment_failed", invoices[-1], created=T0 + 100, event_id="evt_last")
    )
    # And one event is delivered twice: its second copy is a duplicate.
    burst.append(burst[0])
    async with harness(database_url, pool, client, worker=False) as h:
        # No worker yet: every signal waits in the workflow's first task.
        for payload in burst:
            await h.deliver(payload)
        async with running_worker(h.settings, pool, client):
            await h.settle(org.id)
            handle = client.get_workflow_handle(org_billing_id(org.id))
            events = await _idle(handle)
            rows = await h.webhook_rows(org.id)
            billing_row = await h.billing_row(org.id)
            flags = await h.flags(org.id)
    markers = [e for e in events if e["eventType"] == "EVENT_TYPE_MARKER_RECORDED"]
    assert [_patch_id(marker) for marker in markers] == [ONE_WRITE_PER_DRAIN]
    # The seed read, then one write for the whole burst.
    assert _costs(events) == (3, Counter({"load_org_billing": 1, "sync_org_billing": 1}))
    # The PaymentStatus search attribute: set once for the burst (its final status), after the write.
    upserts = [
        json.loads(base64.b64decode(fields["PaymentStatus"]["data"]))
        for e in events
        if "upsertWorkflowSearchAttributesEventAttributes" in e
        for fields in [
            e["upsertWorkflowSearchAttributesEventAttributes"]["searchAttributes"]["indexedFields"]
        ]
        if "PaymentStatus" in fields
    ]
    assert upserts == ["blocked"]
    writes = [e for e in events if "activityTaskScheduledEventAttributes" in e][1:]
    written = _payload(writes[0]["activityTaskScheduledEventAttributes"]["input"])
    assert (written["payment_status"], sorted(written["marks"])) == (
        "blocked",
        sorted({e["id"] for e in burst}),
    )
    assert rows == {e["id"]: ("applied", "applied") for e in burst}
    assert billing_row["payment_status"] == "blocked"
    assert {(p, t) for p, t, _ in flags} == {(p, t) for p in org.project_ids for t in TAGS}
