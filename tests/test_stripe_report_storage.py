"""``storage-overage-hourly``: one storage_gb_hour report per paid org over its limit, per hour."""

from __future__ import annotations

from datetime import date

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.domain.ids import stripe_report_id
from billing.domain.months import parse_month, previous_month
from billing.models.stripe_report import StorageOverageInput, StorageOverageResult, StripeReportResult
from billing.testing.stripe_server import FakeStripe
from tests.conftest import running_worker
from tests.factories import make_org
from tests.report_support import FAST, counted_identifiers, outbox, stripe_settings, this_hour
from workflows.stripe_report import StorageOverageWorkflow

GIB = 1024**3
PRO_INCLUDED = 50 * GIB
FREE_INCLUDED = 1 * GIB


async def _storage_level(pool: AsyncConnectionPool, org_id: str, month: date, value: int) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO org_usage (organization_id, tag, month, value) VALUES (%s, 'storage.usage', %s, %s)",
            [org_id, month, value],
        )


async def test_storage_overage_queued_twice_in_one_hour_is_one_event_per_paid_org(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()
    key = f"{hour:%Y-%m-%dT%H}"
    month = parse_month(f"{hour:%Y-%m}")
    with FakeStripe() as fake:
        over = await make_org(pool, plan="pro", stripe_customer_id=fake.add_customer())
        await _storage_level(pool, over.id, month, PRO_INCLUDED + GIB + GIB // 2)  # 1.5 GiB over -> 2
        # Its level is known only for last month: this month's reset has not carried it over yet.
        carried = await make_org(pool, plan="pro", stripe_customer_id=fake.add_customer())
        await _storage_level(
            pool, carried.id, parse_month(previous_month(f"{hour:%Y-%m}")), PRO_INCLUDED + 3 * GIB
        )
        under = await make_org(pool, plan="pro", stripe_customer_id=fake.add_customer())
        await _storage_level(pool, under.id, month, PRO_INCLUDED)
        free = await make_org(pool, plan="free", stripe_customer_id=fake.add_customer())
        await _storage_level(pool, free.id, month, FREE_INCLUDED * 5)

        settings = stripe_settings(database_url, client, fake)
        results = []
        async with running_worker(settings, pool, client):
            for run in range(2):
                results.append(
                    await client.execute_workflow(
                        StorageOverageWorkflow.run,
                        StorageOverageInput(hour=key, tuning=FAST),
                        id=f"storage-overage-test-{over.id}-{run}",
                        task_queue=settings.task_queue,
                        result_type=StorageOverageResult,
                    )
                )
                for org in (over, carried):
                    handle = client.get_workflow_handle(
                        stripe_report_id(org.id, hour), result_type=StripeReportResult
                    )
                    await handle.result()

        first, second = results
        assert first.queued == 2  # over and carried: the only orgs in this test's database
        assert second.queued == 0
        assert first.reports_started == 2
        assert second.reports_started == 0  # everything was sent by the first run's reports
        identifiers = {
            over.id: f"storage-{over.id}-{key}",
            carried.id: f"storage-{carried.id}-{key}",
        }
        for org, quantity in ((over, 2), (carried, 3)):
            rows = await outbox(pool, org.id)
            assert [(r["identifier"], r["tag"], r["quantity"], r["status"]) for r in rows] == [
                (identifiers[org.id], "storage.usage", quantity, "sent")
            ]
        assert await outbox(pool, under.id) == []
        assert await outbox(pool, free.id) == []
        assert sorted(counted_identifiers(fake)) == sorted(identifiers.values())
        events = {e["identifier"]: e for e in fake.meter_events}
        assert events[identifiers[over.id]]["value"] == 2
        assert events[identifiers[carried.id]]["value"] == 3
        assert {e["event_name"] for e in events.values()} == {"storage_gb_hour"}
        assert {e["timestamp"] for e in events.values()} == {int(hour.timestamp())}

        # The schema itself refuses a second storage row for the same org and hour.
        async with pool.connection() as conn:
            with pytest.raises(psycopg.errors.UniqueViolation):
                await conn.execute(
                    "INSERT INTO stripe_report_outbox (organization_id, tag, month, report_hour,"
                    " event_timestamp, quantity, source, identifier)"
                    " VALUES (%s, 'storage.usage', %s, %s, %s, 1, 'manual', 'another-identifier')",
                    [over.id, month, hour, hour],
                )


async def test_an_hour_in_the_future_is_refused(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    from temporalio.client import WorkflowFailureError

    with FakeStripe() as fake:
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            with pytest.raises(WorkflowFailureError) as failure:
                await client.execute_workflow(
                    StorageOverageWorkflow.run,
                    StorageOverageInput(hour="2999-01-01T00", tuning=FAST),
                    id=f"storage-overage-test-future-{settings.task_queue}",
                    task_queue=settings.task_queue,
                    result_type=StorageOverageResult,
                )
    assert str(failure.value.cause.__cause__) == "hour 2999-01-01T00 is in the future"
