"""``storage-overage-hourly``: one storage_gb_hour report per paid org over its limit, per hour."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleBackfill,
    ScheduleOverlapPolicy,
    ScheduleSpec,
    ScheduleState,
)
from temporalio.common import SearchAttributeKey

from billing.domain.ids import stripe_report_id
from billing.domain.months import parse_month, previous_month
from billing.models.stripe_report import StorageOverageInput, StorageOverageResult, StripeReportResult
from billing.orchestration.temporal import scheduled_jobs
from billing.testing.stripe_server import FakeStripe
from tests.conftest import Clock, make_settings, running_worker
from tests.factories import Org, make_org
from tests.report_support import FAST, counted_identifiers, outbox, stripe_settings, this_hour
from workflows.stripe_report import StorageOverageWorkflow

GIB = 1024**3
# Set by Temporal on every run a schedule starts: the time the run was scheduled for.
SCHEDULED_START = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")
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


async def _storage_ledger(
    pool: AsyncConnectionPool, org: Org, applied_at: datetime, value: int, last_queued: datetime
) -> None:
    """The org's storage level ``value`` from ``applied_at`` on (ledger), and its last queued storage
    hour ``last_queued`` (sent)."""
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO usage_ledger (batch_id, organization_id, project_id, tag, month, counter_rows,"
            " delta, value_after, applied_at) VALUES ('b', %s, %s, 'storage.usage', %s, 1, 0, %s, %s)",
            [org.id, org.project_ids[0], applied_at.date().replace(day=1), value, applied_at],
        )
        await conn.execute(
            "INSERT INTO stripe_report_outbox (organization_id, tag, month, report_hour, event_timestamp,"
            " quantity, source, identifier, status) VALUES (%s, 'storage.usage',"
            " date_trunc('month', %s AT TIME ZONE 'UTC')::date, %s, %s, 1, 'storage:old', %s, 'sent')",
            [org.id, last_queued, last_queued, last_queued, f"old-{org.id}"],
        )


async def test_a_scheduled_run_catches_up_to_its_scheduled_hour_and_never_more_than_35_days_back(
    pool: AsyncConnectionPool, client: Client, database_url: str, clock: Clock
) -> None:
    """The hour comes from TemporalScheduledStartTime, which the schedule sets: a run the schedule
    fires for 3 hours ago (a backfill, as after an outage) queues every missed hour up to that hour,
    not up to now; an org whose last storage hour is 40 days back gets the last 35 days only."""
    now = await clock.freeze()
    scheduled_hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    job = next(j for j in scheduled_jobs() if j.schedule_id == "storage-overage-hourly")
    recent = await make_org(pool, plan="pro", stripe_customer_id="cus_recent")
    # 2 GiB over since well before its last queued hour, 4 hours before the scheduled one.
    await _storage_ledger(
        pool,
        recent,
        scheduled_hour - timedelta(hours=5),
        PRO_INCLUDED + 2 * GIB,
        scheduled_hour - timedelta(hours=4),
    )
    stale = await make_org(pool, plan="pro", stripe_customer_id="cus_stale")
    # 1 GiB over for 41 days; its last queued storage hour 40 days back.
    await _storage_ledger(
        pool,
        stale,
        scheduled_hour - timedelta(days=41),
        PRO_INCLUDED + GIB,
        scheduled_hour - timedelta(days=40),
    )
    # No STRIPE_API_KEY: the run queues and starts no reports, so the rows stay as queued.
    settings = make_settings(database_url, client)
    schedule_id = f"storage-overage-test-{uuid.uuid4().hex[:10]}"
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            job.workflow,
            StorageOverageInput(tuning=FAST),  # no hour: the run takes its scheduled hour
            id=f"{schedule_id}-run",
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(cron_expressions=[job.cron]),
        # Paused: only the backfill below starts a run, whenever the test runs.
        state=ScheduleState(paused=True),
    )
    handle = await client.create_schedule(schedule_id, schedule)
    try:
        fire = scheduled_hour + timedelta(minutes=15)  # the cron fires at :15
        async with running_worker(settings, pool, client):
            await handle.backfill(
                ScheduleBackfill(
                    start_at=fire - timedelta(minutes=1),
                    end_at=fire + timedelta(minutes=1),
                    overlap=ScheduleOverlapPolicy.ALLOW_ALL,
                )
            )
            actions: list[Any] = []
            for _ in range(1200):  # the schedule records its action once it has started the run
                actions = (await handle.describe()).info.recent_actions
                if actions:
                    break
                await asyncio.sleep(0.1)
            assert len(actions) == 1, actions
            assert actions[0].scheduled_at == fire
            run = client.get_workflow_handle(actions[0].action.workflow_id, result_type=StorageOverageResult)
            result = await run.result()
            described = await run.describe()
    finally:
        await handle.delete()
    assert described.typed_search_attributes.get(SCHEDULED_START) == fire
    key = f"{scheduled_hour:%Y-%m-%dT%H}"
    assert (result.hour, result.stripe_configured, result.reports_started) == (key, False, 0)
    # recent: the 3 missed hours and the scheduled one; stale: 35 days of hours, ending at it.
    assert result.queued == 4 + 35 * 24
    assert await _queued_hours(pool, recent.id) == [
        (scheduled_hour - timedelta(hours=h), 2) for h in (3, 2, 1, 0)
    ]
    stale_hours = await _queued_hours(pool, stale.id)
    assert len(stale_hours) == 35 * 24
    assert stale_hours[0] == (scheduled_hour - timedelta(days=35) + timedelta(hours=1), 1)
    assert stale_hours[-1] == (scheduled_hour, 1)
    assert {quantity for _, quantity in stale_hours} == {1}
    assert [hour for hour, _ in stale_hours] == [
        scheduled_hour - timedelta(hours=h) for h in range(35 * 24 - 1, -1, -1)
    ]


async def _queued_hours(pool: AsyncConnectionPool, org_id: str) -> list[tuple[datetime, int]]:
    """(report_hour, quantity) of the org's pending storage rows, oldest first."""
    async with pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT report_hour, quantity FROM stripe_report_outbox WHERE organization_id = %s"
            " AND tag = 'storage.usage' AND status = 'pending' ORDER BY report_hour",
            [org_id],
        )
        return [(row["report_hour"], row["quantity"]) for row in await cursor.fetchall()]
