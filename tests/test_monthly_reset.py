"""``monthly-reset/{org}/{month}`` on the dev server: exactly once, never half-applied."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import date

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import Worker

from billing.core.config import Settings
from billing.domain.ids import monthly_reset_id
from billing.models import MonthlyResetResult
from billing.orchestration.temporal import start_monthly_reset
from tests.conftest import VENV_BIN
from tests.factories import fetch_value, make_org

OCTOBER = date(2026, 10, 1)


async def _october_usage(pool: AsyncConnectionPool, project_id: str, amount: int) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "SELECT increment_project_usage(%s, 'task.created', %s, %s)", [project_id, OCTOBER, amount]
        )


async def _count_executions(client: Client, workflow_id: str) -> int:
    count = 0
    async for _ in client.list_workflows(f"WorkflowId = '{workflow_id}'"):
        count += 1
    return count


async def test_twenty_concurrent_starts_and_one_after_completion_make_one_reset(
    pool: AsyncConnectionPool, client: Client, settings: Settings, worker: Worker
) -> None:
    org = await make_org(pool)
    await _october_usage(pool, org.project_ids[0], 42)

    outcomes = await asyncio.gather(
        *(start_monthly_reset(client, settings.task_queue, org.id, "2026-11") for _ in range(20))
    )
    assert sum(outcome.started for outcome in outcomes) == 1
    workflow_id = monthly_reset_id(org.id, "2026-11")
    result = await client.get_workflow_handle(workflow_id, result_type=MonthlyResetResult).result()
    assert result.claimed is True
    assert result.closed_month == "2026-10"
    assert result.tags_closed == 1

    again = await start_monthly_reset(client, settings.task_queue, org.id, "2026-11")
    assert again.started is False
    assert again.status == WorkflowExecutionStatus.COMPLETED
    claims = await fetch_value(
        pool, "SELECT count(*) FROM monthly_resets WHERE organization_id = %s", [org.id]
    )
    closed = await fetch_value(
        pool,
        "SELECT value FROM closed_month_usage WHERE organization_id = %s AND tag = 'task.created'",
        [org.id],
    )
    assert claims == 1
    assert closed == 42
    # The visibility store is eventually consistent: wait (bounded generously) until it lists the
    # execution; the ID can only ever have one.
    for _ in range(600):
        if await _count_executions(client, workflow_id) == 1:
            break
        await asyncio.sleep(0.1)
    assert await _count_executions(client, workflow_id) == 1


async def test_a_failing_reset_is_retried_and_never_half_applied(
    pool: AsyncConnectionPool, client: Client, settings: Settings, worker: Worker
) -> None:
    org = await make_org(pool)
    await _october_usage(pool, org.project_ids[0], 5)
    # The closing step fails after the claim was made in the same transaction.
    async with pool.connection() as conn:
        await conn.execute(
            """
            CREATE FUNCTION fail_closing() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'injected failure while closing'; END $$;
            CREATE TRIGGER fail_closing BEFORE INSERT ON closed_month_usage
                FOR EACH ROW EXECUTE FUNCTION fail_closing();
            """
        )
    try:
        started = await start_monthly_reset(client, settings.task_queue, org.id, "2026-11")
        assert started.started
        handle = client.get_workflow_handle(started.workflow_id, result_type=MonthlyResetResult)
        for _ in range(600):
            description = await handle.describe()
            pending = description.raw_description.pending_activities
            if pending and pending[0].attempt >= 2:
                break
            await asyncio.sleep(0.1)
        assert pending and pending[0].attempt >= 2, "the failing activity should be retried"
        assert "injected failure" in pending[0].last_failure.message
        claims = await fetch_value(
            pool, "SELECT count(*) FROM monthly_resets WHERE organization_id = %s", [org.id]
        )
        assert claims == 0, "the claim must roll back with the failed close"
    finally:
        async with pool.connection() as conn:
            await conn.execute(
                "DROP TRIGGER fail_closing ON closed_month_usage; DROP FUNCTION fail_closing();"
            )
    result = await handle.result()
    assert result.claimed is True
    assert result.tags_closed == 1
    claims = await fetch_value(
        pool, "SELECT count(*) FROM monthly_resets WHERE organization_id = %s", [org.id]
    )
    assert claims == 1


async def test_two_racing_cli_resets_leave_one_execution_and_one_claim(
    pool: AsyncConnectionPool, client: Client, settings: Settings, worker: Worker
) -> None:
    org = await make_org(pool)
    await _october_usage(pool, org.project_ids[0], 3)
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "BILLING_TASK_QUEUE": settings.task_queue,
    }
    command = [str(VENV_BIN / "billing"), "reset", org.id, "--month", "2026-11"]

    async def run() -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
        )

    first, second = await asyncio.gather(run(), run())
    outputs = sorted([first.stdout.strip(), second.stdout.strip()])
    assert first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    workflow_id = monthly_reset_id(org.id, "2026-11")
    # One of them started and finished the reset; the other found it running or done.
    assert any(line.startswith(f"{workflow_id}: done; closed 2026-10") for line in outputs), outputs
    assert any(
        line in (f"{workflow_id}: already in progress", f"{workflow_id}: already done") for line in outputs
    )
    third = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
    )
    assert third.stdout.strip() == f"{workflow_id}: already done"
    claims = await fetch_value(
        pool, "SELECT count(*) FROM monthly_resets WHERE organization_id = %s", [org.id]
    )
    assert claims == 1
