"""POST /v1/metrics end to end: real API app, real worker, real PostgreSQL and Temporal."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
from psycopg_pool import AsyncConnectionPool

from tests.factories import fetch_value, make_org
from tests.usage_support import (
    ALL_TAGS,
    day_start,
    flags,
    http,
    month_start,
    org_usage,
    project_usage,
    push,
    row,
    utc_now,
)

__all__ = ["http"]  # the fixture, imported so pytest finds it


async def test_a_push_applies_growth_answers_quota_for_every_tag_and_writes_the_ledger(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool, projects=2)
    a, b = org.project_ids
    today = day_start(utc_now())
    answer = await push(
        http,
        [
            row(a, "task.created", today, 40),
            row(a, "space.learned", today, 7),
            row(b, "task.created", today, 2),
        ],
    )
    month = month_start(today)
    assert answer["rejected"] == []
    assert answer["quota"] == [
        {"project_id": project, "tag": tag, "excess": False} for project in sorted([a, b]) for tag in ALL_TAGS
    ]
    assert await project_usage(pool, a, "task.created", month) == 40
    assert await project_usage(pool, b, "task.created", month) == 2
    assert await org_usage(pool, org.id, "task.created", month) == 42
    assert await org_usage(pool, org.id, "space.learned", month) == 7
    ledger = await fetch_value(
        pool, "SELECT sum(delta) FROM usage_ledger WHERE organization_id = %s", [org.id]
    )
    assert ledger == 49
    assert await flags(pool, org.id) == []


async def test_yesterdays_row_at_50_and_todays_new_row_at_3_grow_usage_by_3(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool)
    project = org.project_ids[0]
    now = utc_now()
    today = day_start(now)
    yesterday = today - timedelta(days=1)
    if yesterday.month != today.month:  # keep both days in one month for this test
        today, yesterday = today + timedelta(days=1), today
    month = month_start(today)
    await push(http, [row(project, "task.created", yesterday, 50)])
    assert await org_usage(pool, org.id, "task.created", month) == 50
    # The next push: yesterday's row unchanged, today's row new at 3. The original lost the 3.
    await push(
        http,
        [
            row(project, "task.created", yesterday, 50),
            row(
                project, "task.created", min(today, now), 3, updated_at=min(today, now) + timedelta(seconds=1)
            ),
        ],
    )
    assert await org_usage(pool, org.id, "task.created", month) == 53
    assert await project_usage(pool, project, "task.created", month) == 53


async def test_the_same_batch_pushed_five_times_at_once_changes_usage_once(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool, projects=3)
    today = day_start(utc_now())
    rows = [
        row(p, tag, today, 10 + i)
        for i, p in enumerate(org.project_ids)
        for tag in ("task.created", "space.learned")
    ]
    answers = await asyncio.gather(*(push(http, rows) for _ in range(5)))
    month = month_start(today)
    assert all(answer == answers[0] for answer in answers)
    assert await org_usage(pool, org.id, "task.created", month) == 10 + 11 + 12
    assert await org_usage(pool, org.id, "space.learned", month) == 10 + 11 + 12
    entries = await fetch_value(
        pool, "SELECT count(*) FROM usage_ledger WHERE organization_id = %s", [org.id]
    )
    assert entries == 6
    # And once more afterwards: the completed workflow's answer, nothing applied again.
    assert await push(http, rows) == answers[0]
    assert await org_usage(pool, org.id, "task.created", month) == 33
