"""How the month close saves Temporal round trips, without changing what a reset does."""

from __future__ import annotations

from datetime import date

from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

from billing.core.config import Settings
from billing.models import MonthlyResetResult
from billing.orchestration.temporal import start_monthly_reset
from tests.factories import fetch_value, make_org

OCTOBER = date(2026, 10, 1)


async def test_a_reset_closes_its_month_in_a_local_activity_with_no_activity_task(
    pool: AsyncConnectionPool, client: Client, settings: Settings, worker: Worker
) -> None:
    org = await make_org(pool)
    async with pool.connection() as conn:
        await conn.execute(
            "SELECT increment_project_usage(%s, 'task.created', %s, 9)", [org.project_ids[0], OCTOBER]
        )
    started = await start_monthly_reset(client, settings.task_queue, org.id, "2026-11")
    handle = client.get_workflow_handle(started.workflow_id, result_type=MonthlyResetResult)
    result = await handle.result()
    assert (result.claimed, result.tags_closed) == (True, 1)
    history = await handle.fetch_history()
    types = [event.event_type for event in history.events]
    markers = [
        event.marker_recorded_event_attributes.marker_name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
    ]
    assert "core_local_activity" in markers
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED not in types
    closed = await fetch_value(
        pool,
        "SELECT value FROM closed_month_usage WHERE organization_id = %s AND tag = 'task.created'",
        [org.id],
    )
    assert closed == 9
