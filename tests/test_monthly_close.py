"""The ``monthly-close`` schedule's workflow on the time-skipping server."""

from __future__ import annotations

import uuid
from datetime import date

from psycopg_pool import AsyncConnectionPool
from temporalio.testing import WorkflowEnvironment

from billing.domain.ids import monthly_reset_id
from billing.models import MonthlyCloseInput, MonthlyCloseResult, MonthlyResetResult
from tests.conftest import make_settings, running_worker
from tests.factories import fetch_value, make_org
from workflows.monthly_close import MonthlyCloseWorkflow

MAY = date(2024, 5, 1)  # a past month no other test writes (a month that has not begun is refused)


async def test_monthly_close_starts_one_reset_per_org_with_usage_and_a_rerun_starts_none(
    pool: AsyncConnectionPool, database_url: str, time_skipping_env: WorkflowEnvironment
) -> None:
    client = time_skipping_env.client
    settings = make_settings(database_url, client)
    orgs = [await make_org(pool) for _ in range(3)]
    idle = await make_org(pool)
    async with pool.connection() as conn:
        for org in orgs:
            await conn.execute(
                "SELECT increment_project_usage(%s, 'task.created', %s, 9)", [org.project_ids[0], MAY]
            )

    async with running_worker(settings, pool, client):
        first = await client.execute_workflow(
            MonthlyCloseWorkflow.run,
            MonthlyCloseInput(month="2024-06"),
            id=f"monthly-close-test-{uuid.uuid4()}",
            task_queue=settings.task_queue,
            result_type=MonthlyCloseResult,
        )
        for org in orgs:
            reset = await client.get_workflow_handle(
                monthly_reset_id(org.id, "2024-06"), result_type=MonthlyResetResult
            ).result()
            assert reset.claimed and reset.closed_month == "2024-05" and reset.tags_closed == 1
        second = await client.execute_workflow(
            MonthlyCloseWorkflow.run,
            MonthlyCloseInput(month="2024-06"),
            id=f"monthly-close-test-{uuid.uuid4()}",
            task_queue=settings.task_queue,
            result_type=MonthlyCloseResult,
        )
    assert first == MonthlyCloseResult(month="2024-06", started=3, already_started=0)
    assert second == MonthlyCloseResult(month="2024-06", started=0, already_started=3)
    claims = await fetch_value(pool, "SELECT count(*) FROM monthly_resets WHERE month = '2024-06-01'")
    assert claims == 3
    idle_claims = await fetch_value(
        pool, "SELECT count(*) FROM monthly_resets WHERE organization_id = %s", [idle.id]
    )
    assert idle_claims == 0
