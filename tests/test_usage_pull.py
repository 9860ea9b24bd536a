"""Pull mode against a second database playing the core service's ``metrics`` table."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.worker import Worker

from billing import cli
from billing.config import Settings
from billing.models_sync import PullSyncInput, PullSyncResult
from tests.conftest import fresh_database, make_settings, running_worker
from tests.factories import make_org
from tests.usage_support import day_start, month_start, org_usage, utc_now

CORE_SCHEMA = """
CREATE TABLE metrics (
    project_id  uuid NOT NULL,
    tag         text NOT NULL,
    increment   bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (project_id, tag, created_at)
)
"""


@pytest.fixture
def core_url(postgres_admin_url: str) -> Iterator[str]:
    """A database of the core service with its metrics table."""
    with fresh_database(postgres_admin_url, migrated=False) as url, psycopg.connect(url) as conn:
        conn.execute(CORE_SCHEMA)
        conn.commit()
        yield url


def core_write(url: str, statement: str, params: list[object]) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(statement, params)


async def run_pull(client: Client, task_queue: str) -> PullSyncResult:
    return await client.execute_workflow(
        "PullUsageSyncWorkflow",
        PullSyncInput(),
        id=f"usage-sync/pull-test-{uuid.uuid4()}",
        task_queue=task_queue,
        result_type=PullSyncResult,
    )


async def test_pulls_apply_rows_changed_since_the_watermark(
    core_url: str, database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    settings = make_settings(database_url, client, BILLING_METRICS_SOURCE_URL=core_url)
    org = await make_org(pool, projects=2)
    a, b = org.project_ids
    today = day_start(utc_now())
    month = month_start(today)
    insert = "INSERT INTO metrics VALUES (%s, %s, %s, %s, now())"
    core_write(core_url, insert, [a, "task.created", 30, today])
    core_write(core_url, insert, [b, "task.created", 4, today])
    core_write(core_url, insert, [str(uuid.uuid4()), "task.created", 9, today])  # unknown project
    async with running_worker(settings, pool, client):
        first = await run_pull(client, settings.task_queue)
        assert first.enabled and first.rows_read == 3
        assert first.sync is not None
        assert (first.sync.rows_applied, first.sync.rows_rejected) == (2, 1)
        assert await org_usage(pool, org.id, "task.created", month) == 34

        core_write(
            core_url, "UPDATE metrics SET increment = 45, updated_at = now() WHERE project_id = %s", [a]
        )
        second = await run_pull(client, settings.task_queue)
        # The overlap re-reads the first pull's rows too; unchanged ones diff to nothing.
        assert second.rows_read == 3
        assert second.sync is not None and second.sync.rows_applied == 1
        assert await org_usage(pool, org.id, "task.created", month) == 49
        assert second.watermark is not None and first.watermark is not None
        assert second.watermark > first.watermark

        # `billing sync` runs one pull through Temporal and prints it; nothing new, nothing applied.
        environment = {
            "DATABASE_URL": database_url,
            "TEMPORAL_ADDRESS": settings.temporal_address,
            "BILLING_TASK_QUEUE": settings.task_queue,
            "BILLING_METRICS_SOURCE_URL": core_url,
        }
        with pytest.MonkeyPatch.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            code, output = await asyncio.to_thread(_cli_json, ["sync", "--json"])
        assert code == 0
        printed = PullSyncResult.model_validate(json.loads(output))
        assert printed.enabled
        assert printed.sync is None or printed.sync.rows_applied == 0
        assert await org_usage(pool, org.id, "task.created", month) == 49


def _cli_json(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in this thread (its own event loop) and capture what it prints."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.run(argv)
    return code, buffer.getvalue()


async def test_without_a_source_url_the_pull_says_pull_mode_is_off(
    settings: Settings, worker: Worker, client: Client
) -> None:
    result = await run_pull(client, settings.task_queue)
    assert result == PullSyncResult(
        enabled=False, message="pull mode is off: BILLING_METRICS_SOURCE_URL is not set"
    )
