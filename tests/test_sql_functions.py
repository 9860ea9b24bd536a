"""The SQL functions under real concurrency: separate connections racing on one PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import date

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.factories import fetch_value, make_org

NOVEMBER = date(2026, 11, 1)


async def test_fifty_racing_claims_of_one_month_yield_exactly_one_true(
    pool: AsyncConnectionPool, database_url: str
) -> None:
    org = await make_org(pool)
    connections = [await psycopg.AsyncConnection.connect(database_url, autocommit=True) for _ in range(50)]
    try:
        start = asyncio.Event()

        async def claim(conn: psycopg.AsyncConnection) -> bool:
            await start.wait()
            row = await (
                await conn.execute("SELECT try_claim_monthly_reset(%s, %s)", [org.id, NOVEMBER])
            ).fetchone()
            assert row is not None
            return bool(row[0])

        tasks = [asyncio.create_task(claim(conn)) for conn in connections]
        start.set()
        results = await asyncio.gather(*tasks)
    finally:
        for conn in connections:
            await conn.close()
    assert results.count(True) == 1
    assert results.count(False) == 49
    claims = await fetch_value(
        pool, "SELECT count(*) FROM monthly_resets WHERE organization_id = %s", [org.id]
    )
    assert claims == 1


async def test_32_connections_x_100_increments_from_no_row_give_the_exact_total(
    pool: AsyncConnectionPool, database_url: str
) -> None:
    org = await make_org(pool)
    project = org.project_ids[0]
    connections = [await psycopg.AsyncConnection.connect(database_url, autocommit=True) for _ in range(32)]
    try:
        start = asyncio.Event()

        async def hammer(conn: psycopg.AsyncConnection, delta: int) -> None:
            await start.wait()
            for _ in range(100):
                await conn.execute(
                    "SELECT increment_project_usage(%s, 'task.created', %s, %s)", [project, NOVEMBER, delta]
                )

        tasks = [asyncio.create_task(hammer(conn, delta)) for delta, conn in enumerate(connections, start=1)]
        start.set()
        await asyncio.gather(*tasks)  # a unique violation would surface here
    finally:
        for conn in connections:
            await conn.close()
    expected = 100 * sum(range(1, 33))
    project_total = await fetch_value(
        pool, "SELECT value FROM project_usage WHERE project_id = %s AND tag = 'task.created'", [project]
    )
    org_total = await fetch_value(
        pool, "SELECT value FROM org_usage WHERE organization_id = %s AND tag = 'task.created'", [org.id]
    )
    assert project_total == expected == 52_800
    assert org_total == expected


async def test_increment_of_an_unknown_meter_raises_and_stores_nothing(pool: AsyncConnectionPool) -> None:
    org = await make_org(pool)
    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match=r'unknown meter tag "tasks\.made"'):
            await conn.execute(
                "SELECT increment_project_usage(%s, 'tasks.made', %s, 1)", [org.project_ids[0], NOVEMBER]
            )
    rows = await fetch_value(
        pool, "SELECT count(*) FROM project_usage WHERE project_id = %s", [org.project_ids[0]]
    )
    assert rows == 0


async def test_increment_of_an_unknown_project_raises(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="unknown project"):
            await conn.execute(
                "SELECT increment_project_usage(gen_random_uuid(), 'task.created', %s, 1)", [NOVEMBER]
            )


async def test_close_org_month_records_final_usage_carries_gauges_and_is_idempotent(
    pool: AsyncConnectionPool,
) -> None:
    org = await make_org(pool, projects=2)
    october = date(2026, 10, 1)
    async with pool.connection() as conn:
        for project in org.project_ids:
            await conn.execute(
                "SELECT increment_project_usage(%s, 'task.created', %s, 7)", [project, october]
            )
        await conn.execute(
            "INSERT INTO project_usage (project_id, tag, month, organization_id, value)"
            " VALUES (%s, 'storage.usage', %s, %s, 5000)",
            [org.project_ids[0], october, org.id],
        )
        await conn.execute(
            "INSERT INTO org_usage (organization_id, tag, month, value) VALUES (%s, 'storage.usage', %s, 5000)",
            [org.id, october],
        )
        first = await (
            await conn.execute("SELECT * FROM close_org_month(%s, %s)", [org.id, NOVEMBER])
        ).fetchone()
        second = await (
            await conn.execute("SELECT * FROM close_org_month(%s, %s)", [org.id, NOVEMBER])
        ).fetchone()
        closed = await (
            await conn.execute(
                "SELECT tag, value FROM closed_month_usage WHERE organization_id = %s ORDER BY tag", [org.id]
            )
        ).fetchall()
        november = await (
            await conn.execute(
                "SELECT tag, value FROM org_usage WHERE organization_id = %s AND month = %s ORDER BY tag",
                [org.id, NOVEMBER],
            )
        ).fetchall()
    assert first == {"claimed": True, "closed_month": october, "tags_closed": 2, "flags": 0}
    assert second == {"claimed": False, "closed_month": october, "tags_closed": 0, "flags": 0}
    assert closed == [{"tag": "storage.usage", "value": 5000}, {"tag": "task.created", "value": 14}]
    # Storage is a level and carries into the new month; counters start the month at nothing.
    assert november == [{"tag": "storage.usage", "value": 5000}]


async def test_quota_flags_follow_free_limits_and_payment_blocks(pool: AsyncConnectionPool) -> None:
    free = await make_org(pool, projects=2)
    blocked = await make_org(pool, plan="pro", projects=3, payment_status="blocked")
    async with pool.connection() as conn:
        await conn.execute(
            "SELECT increment_project_usage(%s, 'space.learned', %s, 101)", [free.project_ids[0], NOVEMBER]
        )
        flags = await (
            await conn.execute(
                "SELECT recompute_quota_flags(%s::uuid[], %s)", [[free.id, blocked.id], NOVEMBER]
            )
        ).fetchone()
        free_flags = await (
            await conn.execute(
                "SELECT project_id::text, tag, reason FROM quota_flags WHERE organization_id = %s ORDER BY 1",
                [free.id],
            )
        ).fetchall()
    assert flags == {"recompute_quota_flags": 2 + 3 * 5}
    assert sorted(row["project_id"] for row in free_flags) == sorted(free.project_ids)
    assert {row["tag"] for row in free_flags} == {"space.learned"}
    assert {row["reason"] for row in free_flags} == {"over_limit"}
