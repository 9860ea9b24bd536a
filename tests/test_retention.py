"""Issue 12 finding 7: staged batches and processed webhook events are purged after BILLING_RETENTION,
in small chunks, without losing exactly-once (a purged batch pushed again changes nothing; a batch
inside the retention still deduplicates)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.retention import purge_expired
from api.app import create_app
from billing.core.config import Settings
from billing.core.errors import ConfigError
from billing.db.pool import open_pool
from billing.models import PurgeInput, PurgeResult, RetentionInput
from billing.orchestration.temporal import scheduled_jobs
from billing.testing.scratch import VENV_BIN, fresh_database
from tests.conftest import API_TOKEN, make_settings, running_worker
from tests.factories import fetch_value, make_org
from tests.usage_support import day_start, row, usage_snapshot
from workflows.retention import RetentionWorkflow

RETENTION = timedelta(days=35).total_seconds()


class Stack:
    """A database of this test's own (so ages and counts are exactly what it made), the app, a worker."""

    def __init__(
        self, url: str, settings: Settings, pool: AsyncConnectionPool, http: httpx.AsyncClient
    ) -> None:
        self.url = url
        self.settings = settings
        self.pool = pool
        self.http = http

    async def push(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        response = await self.http.post("/v1/metrics", json={"metrics": rows})
        assert response.status_code == 200, response.text
        return response.json()

    async def age_batch_of(self, rows: list[dict[str, Any]], days: int) -> None:
        """Make the batch of these rows look staged ``days`` ago."""
        from billing.orchestration.usage_batches import batch_id_of

        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE usage_batches SET staged_at = billing_now() - make_interval(days => %s)"
                " WHERE batch_id = %s",
                [days, batch_id_of(rows)],
            )


@pytest.fixture
async def stack(postgres_admin_url: str, temporal_env: WorkflowEnvironment) -> AsyncIterator[Stack]:
    with fresh_database(postgres_admin_url) as url:
        settings = make_settings(url, temporal_env.client)
        pool = await open_pool(url, max_size=5)
        try:
            async with running_worker(settings, pool, temporal_env.client):
                app = create_app(settings, pool, temporal_env.client)
                async with httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url="http://billing.test",
                    headers={"Authorization": f"Bearer {API_TOKEN}"},
                    timeout=120,
                ) as http:
                    yield Stack(url, settings, pool, http)
        finally:
            await pool.close()


async def _add_event(pool: AsyncConnectionPool, status: str, days_old: int) -> str:
    event_id = f"evt_{uuid.uuid4().hex}"
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO stripe_webhook_events (event_id, event_type, event_created, status, received_at)"
            " VALUES (%s, 'invoice.paid', billing_now(), %s, billing_now() - make_interval(days => %s))",
            [event_id, status, days_old],
        )
    return event_id


async def _count(pool: AsyncConnectionPool, table: str) -> object:
    async with pool.connection() as conn:
        statement = sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(table))
        row = await (await conn.execute(statement)).fetchone()
    assert row is not None
    return row["n"]


async def test_purge_deletes_only_what_is_past_the_retention_in_chunks(stack: Stack) -> None:
    org = await make_org(stack.pool)
    project = org.project_ids[0]
    today = day_start(datetime.now(UTC))
    old_rows = [
        row(project, "task.created", today, 10),
        row(project, "space.learned", today, 4),
        row(project, "search.experience.agentic", today, 2),
        {**row(project, "task.created", today, 1), "tag": "no.such.tag"},
        {**row(project, "task.created", today, 1), "increment": -1},
    ]
    new_rows = [row(project, "task.created", today, 12)]
    old_answer = await stack.push(old_rows)
    assert len(old_answer["rejected"]) == 2
    await stack.push(new_rows)
    await stack.age_batch_of(old_rows, 36)
    old_applied = await _add_event(stack.pool, "applied", 40)
    old_unmatched = await _add_event(stack.pool, "unmatched", 36)
    old_pending = await _add_event(stack.pool, "signalled", 40)
    recent = await _add_event(stack.pool, "applied", 30)
    before = await usage_snapshot(stack.pool)

    result = await purge_expired(stack.pool, RETENTION, PurgeInput(chunk=2))

    # 4 staged rows (the negative increment is refused before staging) in chunks of 2, 2 rejections
    # (the unknown tag's from the apply, the negative one's from parsing), 1 batch, 2 processed events.
    assert result == PurgeResult(batch_rows=4, batch_rejections=2, batches=1, webhook_events=2, more=False)
    assert await _count(stack.pool, "usage_batches") == 1
    assert await _count(stack.pool, "usage_batch_rows") == 1
    assert await _count(stack.pool, "usage_batch_rejections") == 0
    assert await _count(stack.pool, "usage_batch_orgs") == 1
    events = await fetch_value(
        stack.pool, "SELECT array_agg(event_id ORDER BY event_id) FROM stripe_webhook_events"
    )
    assert events == sorted([old_pending, recent])
    assert old_applied not in events and old_unmatched not in events  # type: ignore[operator]
    # Purging changes no stored number.
    assert await usage_snapshot(stack.pool) == before

    # A purged batch pushed again is staged anew, and its rows change nothing: each counter row's
    # checkpoint still holds the total already applied.
    await stack.push(old_rows)
    # A batch inside the retention still deduplicates: nothing staged twice, nothing applied twice.
    await stack.push(new_rows)
    assert await usage_snapshot(stack.pool) == before
    assert await _count(stack.pool, "usage_batches") == 2

    # Nothing left to purge: a second pass deletes nothing.
    again = await purge_expired(stack.pool, RETENTION, PurgeInput(chunk=2))
    assert again == PurgeResult()


async def test_a_pass_stops_after_its_chunks_and_says_more(stack: Stack) -> None:
    for days in (40, 41, 42):
        await _add_event(stack.pool, "applied", days)
    first = await purge_expired(stack.pool, RETENTION, PurgeInput(chunk=1, max_chunks=5))
    # Three empty batch steps use three chunks; two events fit in the remaining two.
    assert first == PurgeResult(webhook_events=2, more=True)
    second = await purge_expired(stack.pool, RETENTION, PurgeInput(chunk=1, max_chunks=10))
    assert second == PurgeResult(webhook_events=1, more=False)


async def test_retention_workflow_of_the_daily_schedule_purges(stack: Stack, client: Client) -> None:
    job = next(job for job in scheduled_jobs() if job.schedule_id == "retention-daily")
    assert (job.workflow, job.cron) == (RetentionWorkflow.run, "40 3 * * *")
    for days in (36, 50):
        await _add_event(stack.pool, "applied", days)
    kept = await _add_event(stack.pool, "applied", 1)
    result = await client.execute_workflow(
        RetentionWorkflow.run,
        RetentionInput(chunk=1),
        id=f"retention-test-{uuid.uuid4().hex[:8]}",
        task_queue=stack.settings.task_queue,
    )
    assert result == PurgeResult(webhook_events=2)
    assert await fetch_value(stack.pool, "SELECT array_agg(event_id) FROM stripe_webhook_events") == [kept]


def test_billing_system_shows_what_retention_keeps(postgres_admin_url: str) -> None:
    with fresh_database(postgres_admin_url) as url:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp"),
            "DATABASE_URL": url,
            "BILLING_RETENTION": "40d",
        }
        _check_system_output(env)


def _check_system_output(env: dict[str, str]) -> None:
    output = subprocess.run(
        [str(VENV_BIN / "billing"), "system", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    data = json.loads(output)
    assert (data["retention_days"], data["batches"], data["batch_rows"], data["webhook_events"]) == (
        40,
        0,
        0,
        0,
    )
    text = subprocess.run(
        [str(VENV_BIN / "billing"), "system"], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert text.splitlines() == [
        "retention: 40 days (BILLING_RETENTION), purged daily by the retention-daily schedule",
        "  staged batches: none",
        "  webhook events: none",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("35d", timedelta(days=35)), ("240h", timedelta(hours=240)), ("1d", None), ("35", None), ("-9d", None)],
)
def test_billing_retention_setting(value: str, expected: timedelta | None) -> None:
    if expected is None:
        with pytest.raises(ConfigError, match="BILLING_RETENTION"):
            Settings.load(BILLING_RETENTION=value)
    else:
        assert Settings.load(BILLING_RETENTION=value).retention == expected
