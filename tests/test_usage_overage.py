"""Paid plans: the overage each batch adds (overage after minus before) is queued exactly once."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, time, timedelta

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.core.config import Settings
from billing.domain.months import month_key
from billing.orchestration.temporal import start_monthly_reset
from billing.orchestration.usage_batches import batch_id_of
from tests.factories import make_org
from tests.report_support import outbox
from tests.usage_support import (
    day_start,
    http,
    last_month_day,
    month_start,
    push,
    row,
    utc_now,
)

__all__ = ["http"]
TAG = "search.experience.agentic"  # pro includes 5,000


def identifier(batch: str, org_id: str, tag: str, month: str) -> str:
    return "sync-" + hashlib.sha256(f"{batch}|{org_id}|{tag}|{month}".encode()).hexdigest()


async def test_paid_overage_is_queued_as_the_increase_above_the_included_quantity(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool, plan="pro", projects=2)
    a, b = org.project_ids
    now = utc_now()
    today = day_start(now)
    stamp = min(today + timedelta(seconds=10), now)
    batches = [
        [row(a, TAG, today, 4_000, updated_at=stamp)],
        [row(a, TAG, today, 5_003, updated_at=stamp + timedelta(microseconds=1))],
        [
            row(a, TAG, today, 5_003, updated_at=stamp + timedelta(microseconds=1)),
            row(b, TAG, today, 10, updated_at=stamp),
        ],
        [row(a, "storage.usage", today, 60 * 2**30, updated_at=stamp)],  # gauges: reported hourly elsewhere
    ]
    for rows in batches:
        await push(http, rows)
    await push(http, batches[2])  # a re-push queues nothing more

    queued = await outbox(pool, org.id)
    month = month_key(today)
    assert [(r["tag"], r["quantity"], r["source"]) for r in queued] == [
        (TAG, 3, f"sync:{batch_id_of(batches[1])}"),
        (TAG, 10, f"sync:{batch_id_of(batches[2])}"),
    ]
    assert [r["identifier"] for r in queued] == [
        identifier(batch_id_of(batches[1]), org.id, TAG, month),
        identifier(batch_id_of(batches[2]), org.id, TAG, month),
    ]
    for report in queued:
        assert report["month"] == month_start(today)
        assert report["report_hour"] == report["event_timestamp"].replace(minute=0, second=0, microsecond=0)
        assert month_key(report["event_timestamp"]) == month


async def test_late_overage_of_a_closed_month_is_stamped_with_that_months_last_second(
    http: httpx.AsyncClient, pool: AsyncConnectionPool, client: Client, settings: Settings
) -> None:
    org = await make_org(pool, plan="team")  # team includes 25,000 space.learned
    now = utc_now()
    last_month, old_day = month_start(last_month_day(now)), last_month_day(now)
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO monthly_resets (organization_id, month) VALUES (%s, %s)", [org.id, last_month]
        )
    await push(http, [row(org.project_ids[0], "space.learned", old_day, 24_990)])
    outcome = await start_monthly_reset(client, settings.task_queue, org.id, month_key(now))
    await client.get_workflow_handle(outcome.workflow_id).result()
    late = [
        row(org.project_ids[0], "space.learned", old_day, 25_040, updated_at=old_day + timedelta(hours=9))
    ]
    await push(http, late)
    queued = await outbox(pool, org.id)
    month_end = datetime.combine(month_start(now), time(), UTC) - timedelta(seconds=1)
    assert [(r["month"], r["quantity"], r["event_timestamp"]) for r in queued] == [
        (last_month, 40, month_end)
    ]
