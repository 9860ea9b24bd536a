"""Record workflow histories for the replay test: ``python -m tests.record_histories``.

Runs scenarios of the workflows on their own Temporal dev server and a fresh database, and saves the
histories as ``tests/histories/<name>.json``. Commit the file: tests/test_replay.py replays
every history in that folder, so a change that would break running workflows fails the suite. Re-record
only for a deliberate, versioned change (and keep the old file if old runs may still be open).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio.client import WorkflowHistory

from billing.db import open_pool
from billing.ids import monthly_reset_id, org_billing_id, stripe_report_id, usage_sync_id
from billing.models_billing import OperatorRequest
from billing.months import month_key, parse_month
from billing.org_billing import operator_update, query_org_billing_state
from billing.scratch import scratch_database, temporal_dev_server
from billing.usage_batches import parse_metrics, run_usage_sync, stage_batch
from tests import stripe_payloads as sp
from tests.conftest import running_worker
from tests.factories import make_org
from tests.report_support import stripe_settings
from tests.stripe_server import FakeStripe
from tests.webhook_support import T0, customer_of, harness, paid_org, subscription_of

HISTORIES = Path(__file__).resolve().parent / "histories"


async def record_org_billing() -> Path:
    """Metered and plan failures (both shapes), a Stripe refusal, operator block/unblock, payments."""
    async with temporal_dev_server() as env:
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
    HISTORIES.mkdir(exist_ok=True)
    path = HISTORIES / "org_billing.json"
    path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
    return path


def _save(name: str, history: WorkflowHistory) -> Path:
    HISTORIES.mkdir(exist_ok=True)
    path = HISTORIES / f"{name}.json"
    path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
    return path


async def record_usage_and_reports() -> list[Path]:
    """A monthly reset, a usage sync of a paid org over its limit, and the Stripe report it starts."""
    async with temporal_dev_server() as env:
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
                        "usage_sync": await sync.fetch_history(),
                        "stripe_report": await report.fetch_history(),
                    }
                assert fake.total(customer, "agent_tasks") == 7
            finally:
                await pool.close()
    return [_save(name, history) for name, history in histories.items()]


def main() -> None:
    """Record every history this module knows."""
    print(f"recorded {asyncio.run(record_org_billing())}")
    for path in asyncio.run(record_usage_and_reports()):
        print(f"recorded {path}")


if __name__ == "__main__":
    main()
