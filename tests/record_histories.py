"""Record workflow histories for the replay test: ``python -m tests.record_histories``.

Runs scenarios of the workflows on their own Temporal dev server and a fresh database, and saves the
histories as ``tests/histories/<name>.json``. Commit the file: tests/test_replay.py replays
every history in that folder, so a change that would break running workflows fails the suite. Re-record
only for a deliberate, versioned change (and keep the old file if old runs may still be open).
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHandle, WorkflowHistory

from billing.db.pool import open_pool
from billing.db.sql import query
from billing.domain.hours import hour_key
from billing.domain.ids import monthly_reset_id, org_billing_id, stripe_report_id, usage_sync_id
from billing.domain.months import month_key, parse_month
from billing.models import MonthlyCloseInput
from billing.models.org_billing import OperatorRequest, OrgBillingInput
from billing.models.stripe_report import StorageOverageInput
from billing.models.usage_sync import PullSyncInput
from billing.orchestration.temporal import (
    operator_update,
    query_org_billing_state,
    run_usage_sync,
    start_monthly_reset,
)
from billing.orchestration.usage_batches import parse_metrics, stage_batch
from billing.testing import stripe_payloads as sp
from billing.testing.scratch import (
    fresh_database,
    postgres_server,
    scratch_database,
    throwaway_temporal_server,
)
from billing.testing.stripe_server import FakeStripe
from tests.conftest import running_worker
from tests.factories import make_org
from tests.report_support import stripe_settings
from tests.webhook_support import T0, customer_of, harness, paid_org, subscription_of
from workflows.monthly_close import MonthlyCloseWorkflow
from workflows.org_billing import OrgBillingWorkflow
from workflows.stripe_report import StorageOverageWorkflow
from workflows.usage_sync import PullUsageSyncWorkflow

HISTORIES = Path(__file__).resolve().parent / "histories"


async def record_org_billing(name: str = "org_billing") -> Path:
    """Metered and plan failures (both shapes), a Stripe refusal, operator block/unblock, payments."""
    async with throwaway_temporal_server() as env:
        with scratch_database() as url:
            pool = await open_pool(url, max_size=5)
            try:
                org = await paid_org(pool)
                common = {
                    "customer_id": customer_of(org.id),
                    "subscription_id": subscription_of(org.id),
                    "organization_id": org.id,
                }
                metered = sp.invoice(shape="old", billing_reason="subscription_threshold", **common)
                plan = sp.invoice(shape="new", **common)
                events = [
                    sp.subscription_event(
                        "customer.subscription.created", sp.subscription(**common, plan="pro"), created=T0
                    ),
                    sp.invoice_event("invoice.payment_failed", metered, created=T0 + 10),
                    sp.invoice_event("invoice.payment_failed", plan, created=T0 + 20),
                    sp.invoice_event("invoice.paid", plan, created=T0 + 30),
                    sp.invoice_event("invoice.paid", metered, created=T0 + 40),
                ]
                async with harness(url, pool, env.client) as h:
                    for event in events:
                        await h.deliver(event, times=2)
                    await h.settle(org.id)
                    handle = env.client.get_workflow_handle(org_billing_id(org.id))

                    # Operator actions are updates (update-with-start), answered once enforced.
                    for action in ("block", "unblock"):
                        request = OperatorRequest(
                            reason=f"recorded {action}", request_id=f"recorded-{action}"
                        )
                        await operator_update(env.client, h.settings.task_queue, org.id, action, request)
                    view = await query_org_billing_state(env.client, org.id)
                    assert view is not None and len(view.operator_actions) == 2
                    history = await handle.fetch_history()
            finally:
                await pool.close()
    return _save(name, history)


# Histories of org-billing runs recorded before the org-billing-one-write-per-drain patch (issue 14):
# today's code would record them with the patch, so they are kept as they are, never re-recorded, and
# the old path keeps replaying (the patched scenarios are saved as org_billing_one_write*).
# Likewise ``usage_sync`` and ``pull_usage_sync``, recorded before the usage-sync-apply-in-parts and
# usage-sync-apply-before-reset-check patches (issue 14); today's are saved as ``*_apply_first``.
KEPT = frozenset(
    {"org_billing", "org_billing_continued", "org_billing_continued_last", "usage_sync", "pull_usage_sync"}
)


def _save(name: str, history: WorkflowHistory) -> Path:
    HISTORIES.mkdir(exist_ok=True)
    path = HISTORIES / f"{name}.json"
    if name in KEPT and path.exists():
        return path
    path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
    return path


async def record_usage_and_reports() -> list[Path]:
    """A monthly reset, a usage sync of a paid org over its limit, and the Stripe report it starts."""
    async with throwaway_temporal_server() as env:
        with scratch_database() as url, FakeStripe() as fake:
            pool = await open_pool(url, max_size=5)
            try:
                customer = fake.add_customer()
                org = await make_org(pool, plan="pro", stripe_customer_id=customer)
                settings = stripe_settings(url, env.client, fake)
                now = datetime.now(UTC)
                this_month, last_month = month_key(now), month_key(now.replace(day=1) - timedelta(days=1))
                async with pool.connection() as conn:
                    await conn.execute(
                        "SELECT increment_project_usage(%s, 'task.created', %s, 10)",
                        [org.project_ids[0], parse_month(last_month)],
                    )
                today = now.replace(hour=0, minute=0, second=0, microsecond=0)
                batch = parse_metrics(
                    [
                        {
                            "project_id": org.project_ids[0],
                            "tag": "task.created",
                            "created_at": today.isoformat(),
                            "updated_at": now.isoformat(),
                            "increment": 50_007,
                        },
                    ]
                )
                async with running_worker(settings, pool, env.client):
                    await stage_batch(pool, batch)
                    await run_usage_sync(env.client, settings.task_queue, batch.batch_id)
                    report_id = stripe_report_id(org.id, now)
                    report = env.client.get_workflow_handle(report_id)
                    await report.result()
                    reset = env.client.get_workflow_handle(monthly_reset_id(org.id, this_month))
                    await reset.result()
                    sync = env.client.get_workflow_handle(usage_sync_id(batch.batch_id))
                    histories = {
                        "monthly_reset": await reset.fetch_history(),
                        "usage_sync_apply_first": await sync.fetch_history(),
                        "stripe_report": await report.fetch_history(),
                    }
                assert fake.total(customer, "agent_tasks") == 7
            finally:
                await pool.close()
    return [_save(name, history) for name, history in histories.items()]


async def _wait_for_retry(handle: WorkflowHandle[Any, Any], attempt: int = 2) -> None:
    """Until the workflow's pending activity has failed and is on ``attempt`` (or later)."""
    for _ in range(1200):
        pending = (await handle.describe()).raw_description.pending_activities
        if pending and pending[0].attempt >= attempt:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{handle.id}: the failing activity was never retried")


async def record_sweeps_and_failure_paths() -> list[Path]:
    """The workflow types without a history yet and the failure paths:

    ``monthly_close`` (the schedule's walk over the orgs), ``storage_overage`` (the hourly storage
    sweep and the report it starts), ``pull_usage_sync_apply_first`` (the hourly pull from a metrics table),
    ``monthly_reset_retried`` (the close fails once and its activity is retried), and
    ``org_billing_continued`` (a burst of events that continues as new with signals still queued, and
    the run that carries them on).
    """
    async with throwaway_temporal_server() as env:
        with postgres_server() as admin, fresh_database(admin, prefix="billing_scratch") as url:
            with fresh_database(admin, migrated=False, prefix="billing_core") as core, FakeStripe() as fake:
                with psycopg.connect(core) as conn:
                    conn.execute(query("core_metrics_table"))
                pool = await open_pool(url, max_size=10)
                try:
                    return await _record_sweeps_and_failure_paths(env.client, pool, url, core, fake)
                finally:
                    await pool.close()


async def _record_sweeps_and_failure_paths(
    client: Client, pool: AsyncConnectionPool, url: str, core: str, fake: FakeStripe
) -> list[Path]:
    histories: dict[str, WorkflowHistory] = {}
    now = datetime.now(UTC)
    this_month, last_month = month_key(now), month_key(now.replace(day=1) - timedelta(days=1))
    settings = stripe_settings(url, client, fake, BILLING_METRICS_SOURCE_URL=core)
    reset_org = await make_org(pool, plan="pro", stripe_customer_id=fake.add_customer())
    other_org = await make_org(pool, plan="free")
    async with pool.connection() as conn:
        for org in (reset_org, other_org):
            await conn.execute(
                "SELECT increment_project_usage(%s, 'task.created', %s, 10)",
                [org.project_ids[0], parse_month(last_month)],
            )
        # The first close of reset_org fails (a real failure of its transaction), then works.
        await conn.execute(
            "CREATE FUNCTION fail_closing_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'injected failure while closing'; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER fail_closing_once BEFORE INSERT ON closed_month_usage "
            "FOR EACH ROW EXECUTE FUNCTION fail_closing_once()"
        )
    async with running_worker(settings, pool, client):
        try:
            started = await start_monthly_reset(client, settings.task_queue, reset_org.id, this_month)
            retried = client.get_workflow_handle(started.workflow_id)
            await _wait_for_retry(retried)
        finally:
            async with pool.connection() as conn:
                await conn.execute("DROP TRIGGER fail_closing_once ON closed_month_usage")
                await conn.execute("DROP FUNCTION fail_closing_once()")
        await retried.result()
        histories["monthly_reset_retried"] = await retried.fetch_history()

        close = await client.start_workflow(
            MonthlyCloseWorkflow.run,
            MonthlyCloseInput(month=this_month),
            id=f"monthly-close-recorded-{this_month}",
            task_queue=settings.task_queue,
        )
        await close.result()
        await client.get_workflow_handle(monthly_reset_id(other_org.id, this_month)).result()
        histories["monthly_close"] = await close.fetch_history()

        hour = now.replace(minute=0, second=0, microsecond=0)
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO org_usage (organization_id, tag, month, value) VALUES (%s, 'storage.usage', %s, %s)",
                [reset_org.id, parse_month(this_month), 52 * 1024**3],
            )
        storage = await client.start_workflow(
            StorageOverageWorkflow.run,
            StorageOverageInput(hour=hour_key(hour)),
            id=f"storage-overage-recorded-{hour_key(hour)}",
            task_queue=settings.task_queue,
        )
        await storage.result()
        await client.get_workflow_handle(stripe_report_id(reset_org.id, hour)).result()
        histories["storage_overage"] = await storage.fetch_history()

        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        with psycopg.connect(core) as conn:
            conn.execute(
                "INSERT INTO metrics (project_id, tag, increment, created_at, updated_at)"
                " VALUES (%s, 'task.created', 5, %s, %s)",
                [other_org.project_ids[0], today, now],
            )
        pull = await client.start_workflow(
            PullUsageSyncWorkflow.run,
            PullSyncInput(),
            id=f"usage-sync/pull-recorded-{uuid.uuid4()}",
            task_queue=settings.task_queue,
        )
        await pull.result()
        histories["pull_usage_sync_apply_first"] = await pull.fetch_history()

        histories |= await _record_continue_as_new(client, pool, url, settings.task_queue)
    return [_save(name, history) for name, history in histories.items()]


async def _record_continue_as_new(
    client: Client, pool: AsyncConnectionPool, url: str, task_queue: str
) -> dict[str, WorkflowHistory]:
    """org-billing with three events per run and a burst of eight: a run ends with signals queued."""
    org = await paid_org(pool)
    common = {
        "customer_id": customer_of(org.id),
        "subscription_id": subscription_of(org.id),
        "organization_id": org.id,
    }
    invoices = [sp.invoice(billing_reason="subscription_threshold", **common) for _ in range(4)]
    events = [
        sp.invoice_event(kind, invoice, created=T0 + 10 * i + (5 if kind == "invoice.paid" else 0))
        for i, invoice in enumerate(invoices)
        for kind in ("invoice.payment_failed", "invoice.paid")
    ]
    async with harness(url, pool, client) as h:
        handle = await client.start_workflow(
            OrgBillingWorkflow.run,
            OrgBillingInput(org_id=org.id, max_events_per_run=3),
            id=org_billing_id(org.id),
            task_queue=h.settings.task_queue,
        )
        # Signalled all at once: the first run continues as new with the rest still in its queue.
        responses = await asyncio.gather(*(h.post(event) for event in events))
        assert {r.status_code for r in responses} == {200}, [r.text for r in responses]
        h.delivered |= {event["id"] for event in events}
        view = await h.settle(org.id)
        assert view.events_applied == len(events), view
        first = client.get_workflow_handle(org_billing_id(org.id), run_id=handle.first_execution_run_id)
        first_run = await first.fetch_history()
        last_run = await client.get_workflow_handle(org_billing_id(org.id)).fetch_history()
    carried = _carried_queue(first_run)
    assert carried, "the first run continued as new with nothing queued: record again"
    return {"org_billing_continued": first_run, "org_billing_continued_last": last_run}


def _carried_queue(history: WorkflowHistory) -> list[Any]:
    """The signals a run carried into its next run (empty if it did not continue as new)."""
    last = json.loads(history.to_json())["events"][-1]
    attributes = last.get("workflowExecutionContinuedAsNewEventAttributes")
    if attributes is None:
        return []
    payload = attributes["input"]["payloads"][0]["data"]
    return json.loads(base64.b64decode(payload))["queue"]


async def record_one_write_per_drain() -> list[Path]:
    """org-billing with the ONE_WRITE_PER_DRAIN patch (issue 14): the scenario of ``org_billing`` and
    the continue-as-new pair, under new names. The histories recorded before the patch stay as they
    are, so both paths keep replaying."""
    paths = [await record_org_billing("org_billing_one_write")]
    async with throwaway_temporal_server() as env:
        with scratch_database() as url:
            pool = await open_pool(url, max_size=10)
            try:
                histories = await _record_continue_as_new(env.client, pool, url, f"one-write-{uuid.uuid4()}")
            finally:
                await pool.close()
    renamed = {"org_billing_continued": "org_billing_one_write_continued"}
    renamed["org_billing_continued_last"] = "org_billing_one_write_continued_last"
    return paths + [_save(renamed[name], history) for name, history in histories.items()]


def main() -> None:
    """Record every history this module knows (those in KEPT only when missing)."""
    print(f"recorded (or kept) {asyncio.run(record_org_billing())}")
    for path in asyncio.run(record_one_write_per_drain()):
        print(f"recorded {path}")
    for path in asyncio.run(record_usage_and_reports()):
        print(f"recorded {path}")
    for path in asyncio.run(record_sweeps_and_failure_paths()):
        print(f"recorded {path}")


if __name__ == "__main__":
    main()
