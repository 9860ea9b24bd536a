"""Pull mode against a second database playing the core service's ``metrics`` table."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.worker import Worker

from billing.cli import main as cli
from billing.core.config import Settings
from billing.db.sql import query
from billing.domain.ids import monthly_reset_id
from billing.domain.months import month_key
from billing.models.usage_sync import PullSyncInput, PullSyncResult
from billing.orchestration.temporal import start_monthly_reset
from tests.conftest import fresh_database, make_settings, running_worker
from tests.factories import make_org
from tests.usage_support import day_start, month_start, org_usage, utc_now
from workflows.usage_sync import PullUsageSyncWorkflow


@pytest.fixture
def core_url(postgres_admin_url: str) -> Iterator[str]:
    """A database of the core service with its metrics table."""
    with fresh_database(postgres_admin_url, migrated=False) as url, psycopg.connect(url) as conn:
        conn.execute(query("core_metrics_table"))
        conn.commit()
        yield url


def core_write(url: str, statement: str, params: list[object]) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(statement, params)


async def run_pull(client: Client, task_queue: str) -> PullSyncResult:
    return await client.execute_workflow(
        PullUsageSyncWorkflow.run,
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


async def test_one_held_back_org_never_freezes_the_watermark_and_a_later_pull_applies_its_rows(
    core_url: str, database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    settings = make_settings(database_url, client, BILLING_METRICS_SOURCE_URL=core_url)
    held, healthy = await make_org(pool), await make_org(pool)
    now = utc_now()
    today, month = day_start(now), month_start(now)
    last_month = month_start(today.replace(day=1) - timedelta(days=1))
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO monthly_resets (organization_id, month) VALUES (%s, %s)", [held.id, last_month]
        )
    failing = f"fail_reset_{held.id.replace('-', '')[:12]}"
    async with pool.connection() as conn:
        await conn.execute(
            f"CREATE FUNCTION {failing}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.organization_id = '{held.id}' THEN RAISE EXCEPTION 'injected reset failure'; END IF; "
            "RETURN NEW; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER {failing} BEFORE INSERT ON monthly_resets FOR EACH ROW EXECUTE FUNCTION {failing}()"
        )
    insert = "INSERT INTO metrics VALUES (%s, %s, %s, %s, now())"
    core_write(core_url, insert, [held.project_ids[0], "task.created", 12, today])
    core_write(core_url, insert, [healthy.project_ids[0], "task.created", 5, today])
    pull = PullSyncInput(overlap_seconds=0, reset_wait_seconds=1.0)
    reset_id = monthly_reset_id(held.id, month_key(month))
    async with running_worker(settings, pool, client):
        try:
            first = await client.execute_workflow(
                PullUsageSyncWorkflow.run,
                pull,
                id=f"usage-sync/pull-test-{uuid.uuid4()}",
                task_queue=settings.task_queue,
                result_type=PullSyncResult,
            )
            await client.get_workflow_handle(reset_id).terminate("gave up on it")
        finally:
            async with pool.connection() as conn:
                await conn.execute(f"DROP TRIGGER {failing} ON monthly_resets")
                await conn.execute(f"DROP FUNCTION {failing}()")
        assert first.sync is not None and (first.sync.orgs_skipped, first.sync.rows_pending) == (1, 1)
        assert first.watermark is not None  # the healthy org's rows do not wait for the held one
        assert await org_usage(pool, healthy.id, "task.created", month) == 5
        assert await org_usage(pool, held.id, "task.created", month) == 0

        rerun = await start_monthly_reset(client, settings.task_queue, held.id, month_key(month))
        assert rerun.rerun
        await client.get_workflow_handle(reset_id).result()
        second = await client.execute_workflow(
            PullUsageSyncWorkflow.run,
            pull,
            id=f"usage-sync/pull-test-{uuid.uuid4()}",
            task_queue=settings.task_queue,
            result_type=PullSyncResult,
        )
    # Nothing new in the window; the held-back batch ran again and applied the rest, once.
    assert second.rows_read == 0
    assert [(r.batch_id, r.orgs_skipped, r.rows_applied) for r in second.reruns] == [(first.batch_id, 0, 2)]
    assert second.watermark is not None and second.watermark >= first.watermark
    assert await org_usage(pool, held.id, "task.created", month) == 12
    assert await org_usage(pool, healthy.id, "task.created", month) == 5
