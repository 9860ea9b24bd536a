"""Concurrent batches: usage equals the true growth exactly, and no lock error reaches a caller."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import httpx
from psycopg_pool import AsyncConnectionPool

from tests.factories import fetch_value, make_org
from tests.usage_support import day_start, http, month_start, org_usage, push, row, utc_now

__all__ = ["http"]


async def deadlocks(pool: AsyncConnectionPool) -> object:
    """PostgreSQL's count of deadlocks detected in this database (the activity would hide a retried one)."""
    async with pool.connection() as conn:
        await conn.execute("SELECT pg_stat_force_next_flush()")
    return await fetch_value(
        pool, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )


async def test_eight_different_overlapping_batches_at_once_count_each_row_by_its_highest_total(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    orgs = [await make_org(pool, projects=3) for _ in range(3)]
    now = utc_now()
    today = day_start(now)
    yesterday = today - timedelta(days=1)
    days = [today] if yesterday.month != today.month else [yesterday, today]
    keys = [
        (org.id, project, tag, day)
        for org in orgs
        for project in org.project_ids
        for tag in ("task.created", "search.experience.embedding")
        for day in days
    ]
    rng = random.Random(7)
    batches = []
    true_total: dict[tuple[str, str, str, object], int] = {}
    for version in range(1, 9):
        chosen = rng.sample(keys, k=len(keys) * 2 // 3)  # overlapping subsets, in different orders
        rows = []
        for org_id, project, tag, day in chosen:
            total = 10 * version + len(tag)
            stamp = min(day + timedelta(minutes=version), now)
            rows.append(row(project, tag, day, total, updated_at=stamp))
            true_total[(org_id, project, tag, day)] = max(
                true_total.get((org_id, project, tag, day), 0), total
            )
        batches.append(rows)

    deadlocks_before = await deadlocks(pool)
    answers = await asyncio.gather(*(push(http, rows) for rows in batches))

    month = month_start(today)
    for org in orgs:
        for tag in ("task.created", "search.experience.embedding"):
            expected = sum(
                total for (org_id, _, t, _), total in true_total.items() if org_id == org.id and t == tag
            )
            assert await org_usage(pool, org.id, tag, month) == expected
    # Each row either applied growth or was rejected as older than what a faster batch applied.
    assert all(
        entry["reason"].startswith("went backwards") for answer in answers for entry in answer["rejected"]
    )
    ledger = await fetch_value(
        pool,
        "SELECT sum(delta) FROM usage_ledger WHERE organization_id = ANY(%s::uuid[])",
        [[org.id for org in orgs]],
    )
    assert ledger == sum(true_total.values())
    assert await deadlocks(pool) == deadlocks_before


async def test_two_batches_with_the_same_row_at_different_totals_diff_against_each_other(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool)
    project = org.project_ids[0]
    today = day_start(utc_now())
    month = month_start(today)
    for round_ in range(1, 6):
        low = row(
            project, "task.created", today, 100 * round_, updated_at=today + timedelta(seconds=2 * round_)
        )
        high = row(
            project,
            "task.created",
            today,
            100 * round_ + 50,
            updated_at=today + timedelta(seconds=2 * round_ + 1),
        )
        await asyncio.gather(push(http, [low]), push(http, [high]))
        # Whichever applied first, the row counts its highest total once.
        assert await org_usage(pool, org.id, "task.created", month) == 100 * round_ + 50
