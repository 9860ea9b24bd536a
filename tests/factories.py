"""Test data written straight into PostgreSQL, the way the product's dashboard may write it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool


@dataclass(frozen=True)
class Org:
    """An organization made for a test, with its projects."""

    id: str
    project_ids: list[str]


async def make_org(
    pool: AsyncConnectionPool,
    *,
    plan: str = "free",
    projects: int = 1,
    stripe_customer_id: str | None = None,
    payment_status: str = "ok",
) -> Org:
    """Insert an org with a billing row and ``projects`` projects."""
    org_id = str(uuid.uuid4())
    project_ids = [str(uuid.uuid4()) for _ in range(projects)]
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO organizations (id, name) VALUES (%s, %s)", [org_id, f"org {org_id[:8]}"]
        )
        await conn.execute(
            "INSERT INTO organization_billing (organization_id, plan, stripe_customer_id, payment_status)"
            " VALUES (%s, %s, %s, %s)",
            [org_id, plan, stripe_customer_id, payment_status],
        )
        for project_id in project_ids:
            await conn.execute(
                "INSERT INTO organization_projects (organization_id, project_id, name) VALUES (%s, %s, %s)",
                [org_id, project_id, f"project {project_id[:8]}"],
            )
    return Org(org_id, project_ids)


async def fetch_value(
    pool: AsyncConnectionPool, statement: str, params: list[object] | None = None
) -> object:
    """The first column of the first row of a query (None when there is no row)."""
    async with pool.connection() as conn:
        row = await (await conn.execute(statement, params or [])).fetchone()
    return None if row is None else next(iter(row.values()))
