"""Helpers of the usage-sync tests: counter rows, pushes through the real API, stored numbers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.worker import Worker

from api.app import create_app
from billing.core.clock import utcnow
from billing.core.config import Settings
from tests.conftest import API_TOKEN, Clock

COUNTERS = ("search.experience.agentic", "search.experience.embedding", "space.learned", "task.created")
ALL_TAGS = (
    "search.experience.agentic",
    "search.experience.embedding",
    "space.learned",
    "storage.usage",
    "task.created",
)


def utc_now() -> datetime:
    """Now by ``billing.core.clock`` (pinned for the test by the ``http`` fixture's clock)."""
    return utcnow()


def day_start(moment: datetime) -> datetime:
    """Midnight UTC of a moment's day: the created_at of that day's counter row."""
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(moment: datetime) -> date:
    return moment.astimezone(UTC).date().replace(day=1)


def last_month_day(now: datetime) -> datetime:
    """Midnight UTC of a day in the month before ``now``'s."""
    return day_start(now.replace(day=1) - timedelta(days=3))


def row(
    project_id: str, tag: str, created_at: datetime, total: int, *, updated_at: datetime | None = None
) -> dict[str, Any]:
    """One counter row as the core service pushes it.

    Without ``updated_at``, the row last grew a little after it was created (more for a larger total),
    but never after the test's "now": early in a UTC day, today's row cannot have grown an hour ago.
    """
    if updated_at is None:
        grown = created_at + timedelta(seconds=total % 3600 + 1)
        updated_at = min(grown, max(created_at, utc_now()))
    return {
        "project_id": project_id,
        "tag": tag,
        "created_at": created_at.isoformat(),
        "updated_at": updated_at.isoformat(),
        "increment": total,
    }


@pytest.fixture
async def http(
    settings: Settings, pool: AsyncConnectionPool, client: Client, worker: Worker, clock: Clock
) -> AsyncIterator[httpx.AsyncClient]:
    """The real API app on the test's task queue, a worker running, authenticated by default.

    The test's clock is pinned at the present (SQL and Python), so rows dated "today" and the month
    the product sees stay one month even when the test runs across midnight at a month's end.
    """
    await clock.freeze()
    app = create_app(settings, pool, client)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://billing.test",
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=120,
    ) as http_client:
        yield http_client


async def push(http: httpx.AsyncClient, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """POST the rows; the answer must be 200."""
    response = await http.post("/v1/metrics", json={"metrics": rows})
    assert response.status_code == 200, response.text
    return response.json()


async def project_usage(pool: AsyncConnectionPool, project_id: str, tag: str, month: date) -> int:
    async with pool.connection() as conn:
        found = await (
            await conn.execute(
                "SELECT value FROM project_usage WHERE project_id = %s AND tag = %s AND month = %s",
                [project_id, tag, month],
            )
        ).fetchone()
    return 0 if found is None else found["value"]


async def org_usage(pool: AsyncConnectionPool, org_id: str, tag: str, month: date) -> int:
    async with pool.connection() as conn:
        found = await (
            await conn.execute(
                "SELECT value FROM org_usage WHERE organization_id = %s AND tag = %s AND month = %s",
                [org_id, tag, month],
            )
        ).fetchone()
    return 0 if found is None else found["value"]


async def flags(pool: AsyncConnectionPool, org_id: str) -> list[tuple[str, str, str]]:
    """(project, tag, reason) of every quota flag of the org."""
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT project_id::text, tag, reason FROM quota_flags WHERE organization_id = %s ORDER BY 1, 2",
                [org_id],
            )
        ).fetchall()
    return [(r["project_id"], r["tag"], r["reason"]) for r in rows]


_SNAPSHOT_TABLES = (
    ("project_usage", "project_id, tag, month, value"),
    ("org_usage", "organization_id, tag, month, value"),
    ("counter_checkpoints", "project_id, tag, row_created_at, applied_total, row_updated_at"),
    ("usage_ledger", "batch_id, project_id, tag, month, delta, value_after"),
    ("quota_flags", "project_id, tag, reason, month"),
    ("monthly_resets", "organization_id, month"),
    ("stripe_report_outbox", "organization_id, tag, month, quantity, identifier"),
)


async def usage_snapshot(pool: AsyncConnectionPool) -> dict[str, list[tuple[Any, ...]]]:
    """Every stored number of the usage tables, to compare before and after."""
    snapshot = {}
    async with pool.connection() as conn:
        for table, columns in _SNAPSHOT_TABLES:
            cursor = conn.cursor(row_factory=None)  # type: ignore[call-overload]
            await cursor.execute(f"SELECT {columns} FROM {table} ORDER BY {columns}")
            snapshot[table] = await cursor.fetchall()
    return snapshot
