"""A push of 100,000 rows (the contract's maximum) works: staged by COPY, applied in one transaction."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
from psycopg_pool import AsyncConnectionPool

from tests.factories import fetch_value
from tests.usage_support import COUNTERS, day_start, http, push, row, utc_now

__all__ = ["http"]


async def test_a_push_of_100000_rows_applies_every_row(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org_ids = [str(uuid.uuid4()) for _ in range(100)]
    projects = {org_id: [str(uuid.uuid4()) for _ in range(10)] for org_id in org_ids}
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO organizations (id) SELECT unnest(%s::uuid[])", [org_ids])
        await conn.execute(
            "INSERT INTO organization_projects (organization_id, project_id)"
            " SELECT unnest(%s::uuid[]), unnest(%s::uuid[])",
            [[o for o in org_ids for _ in projects[o]], [p for o in org_ids for p in projects[o]]],
        )
    today = day_start(utc_now())
    rows = [
        row(project, tag, today - timedelta(days=day), 1 + (n + day) % 50)
        for n, project in enumerate(p for o in org_ids for p in projects[o])
        for tag in COUNTERS
        for day in range(25)
    ]
    assert len(rows) == 100_000
    answer = await push(http, rows)
    assert answer["rejected"] == []
    assert len(answer["quota"]) == 1_000 * 5
    applied = await fetch_value(
        pool, "SELECT sum(value) FROM org_usage WHERE organization_id = ANY(%s::uuid[])", [org_ids]
    )
    assert applied == sum(r["increment"] for r in rows)
    # One ledger entry per project, meter and month the batch changed, accounting for every row.
    entries = await fetch_value(
        pool, "SELECT count(*) FROM usage_ledger WHERE organization_id = ANY(%s::uuid[])", [org_ids]
    )
    counted = await fetch_value(
        pool, "SELECT sum(counter_rows) FROM usage_ledger WHERE organization_id = ANY(%s::uuid[])", [org_ids]
    )
    assert entries == len({(r["project_id"], r["tag"], r["created_at"][:7]) for r in rows})
    assert counted == 100_000
