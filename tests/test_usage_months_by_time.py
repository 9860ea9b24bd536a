"""Months are opened by time, never by input; flags follow the month open when they are written; resets
that did not complete run again; a push that could not apply everything answers 503 (issues 11 and 12).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.app import create_app
from billing.core.config import Settings
from billing.db.sql import query
from billing.domain.ids import monthly_reset_id, usage_sync_id
from billing.domain.months import month_key
from billing.models import MonthlyResetInput, MonthlyResetResult
from billing.models.usage_sync import INPUT_ERROR
from billing.orchestration.temporal import MonthNotBegun, start_monthly_reset
from billing.orchestration.usage_batches import parse_metrics, stage_batch
from tests.conftest import API_TOKEN, VENV_BIN, make_settings, running_worker
from tests.factories import fetch_value, make_org
from tests.usage_support import (
    day_start,
    flags,
    http,
    last_month_day,
    month_start,
    org_usage,
    push,
    row,
    usage_snapshot,
    utc_now,
)
from workflows.monthly_reset import MonthlyResetWorkflow

__all__ = ["http"]

# The database clock of the SQL-level tests below (SET billing.now on their own sessions).
OCT_31_2357 = datetime(2026, 10, 31, 23, 57, tzinfo=UTC)
NOV_15 = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


async def _session(url: str, now: datetime) -> psycopg.AsyncConnection[dict[str, Any]]:
    """An autocommit connection of its own whose database clock (billing_now()) reads ``now``."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row)
    await conn.execute("SELECT set_config('billing.now', %s, false)", [now.isoformat()])
    return conn


async def _stage(pool: AsyncConnectionPool, rows: list[dict[str, Any]]) -> str:
    batch = parse_metrics(rows)
    await stage_batch(pool, batch)
    return batch.batch_id


async def _open_month(pool: AsyncConnectionPool, org_id: str, month: date) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO monthly_resets (organization_id, month) VALUES (%s, %s)", [org_id, month]
        )


def _cli_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "BILLING_TASK_QUEUE": settings.task_queue,
    }


async def _billing(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(VENV_BIN / "billing"), *args],
        env=_cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- 1. Months opened by time -------------------------------------------------------------------


async def test_rows_after_now_never_open_a_month_and_a_row_of_a_month_not_begun_is_rejected(
    pool: AsyncConnectionPool, database_url: str
) -> None:
    org = await make_org(pool)
    project = org.project_ids[0]
    await _open_month(pool, org.id, date(2026, 10, 1))
    early_november = datetime(2026, 11, 1, 0, 1, tzinfo=UTC)  # within the 5 minutes of skew
    rows = [
        row(project, "task.created", datetime(2026, 10, 31, tzinfo=UTC), 4, updated_at=OCT_31_2357),
        row(project, "task.created", early_november, 7, updated_at=early_november + timedelta(seconds=30)),
        row(project, "task.created", datetime(2099, 1, 1, tzinfo=UTC), 1600),
    ]
    batch_id = await _stage(pool, rows)
    conn = await _session(database_url, OCT_31_2357)
    async with conn:
        needed = await (await conn.execute(query("batch_resets_needed"), {"batch_id": batch_id})).fetchall()
        assert needed == []  # neither the 2099 row nor the one of November opens a month
        async with conn.transaction():
            result = await (await conn.execute(query("apply_usage_batch"), {"batch_id": batch_id})).fetchone()
        rejected = await (await conn.execute(query("batch_rejections"), {"batch_id": batch_id})).fetchall()
    assert result is not None
    assert (result["rows_applied"], result["rows_rejected"], result["rows_pending"]) == (1, 2, 0)
    assert rejected == [
        {"index": 1, "reason": "month 2026-11 has not begun"},
        {"index": 2, "reason": "updated_at is in the future"},
    ]
    assert await org_usage(pool, org.id, "task.created", date(2026, 10, 1)) == 4
    assert await org_usage(pool, org.id, "task.created", date(2026, 11, 1)) == 0
    months = await fetch_value(
        pool,
        "SELECT array_agg(month ORDER BY month) FROM monthly_resets WHERE organization_id = %s",
        [org.id],
    )
    assert months == [date(2026, 10, 1)]


async def test_the_sql_claim_refuses_a_month_that_has_not_begun(
    pool: AsyncConnectionPool, database_url: str
) -> None:
    org = await make_org(pool)
    conn = await _session(database_url, OCT_31_2357)
    async with conn:
        for statement in (
            "SELECT * FROM close_org_month(%s, '2026-11-01')",
            "SELECT try_claim_monthly_reset(%s, '2026-11-01')",
        ):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="month 2026-11 has not begun"):
                await conn.execute(statement, [org.id])
        closed = await (
            await conn.execute("SELECT * FROM close_org_month(%s, '2026-10-01')", [org.id])
        ).fetchone()
    assert closed is not None and closed["claimed"] is True
    claims = await fetch_value(
        pool, "SELECT array_agg(month) FROM monthly_resets WHERE organization_id = %s", [org.id]
    )
    assert claims == [date(2026, 10, 1)]


async def test_billing_reset_refuses_a_month_after_the_current_one(
    pool: AsyncConnectionPool, client: Client, settings: Settings
) -> None:
    org = await make_org(pool)
    now = utc_now()
    next_month = month_key(now.replace(day=28) + timedelta(days=5))
    with pytest.raises(MonthNotBegun):
        await start_monthly_reset(client, settings.task_queue, org.id, next_month)
    done = await _billing(settings, "reset", org.id, "--month", "2099-01")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0
    assert "month 2099-01 has not begun" in done.stderr
    # Describe reads the execution itself (no visibility lag): NOT_FOUND means no run was started.
    for month in (next_month, "2099-01"):
        with pytest.raises(RPCError) as missing:
            await client.get_workflow_handle(monthly_reset_id(org.id, month)).describe()
        assert missing.value.status == RPCStatusCode.NOT_FOUND, month
    assert (
        await fetch_value(pool, "SELECT count(*) FROM monthly_resets WHERE organization_id = %s", [org.id])
        == 0
    )
    # The probe looks where a start goes: past the check, the same call starts exactly that ID (no
    # worker polls this test's queue, so the run does nothing before it is terminated).
    started = await start_monthly_reset(client, settings.task_queue, org.id, next_month, check_month=False)
    handle = client.get_workflow_handle(monthly_reset_id(org.id, next_month))
    assert (started.workflow_id, started.started) == (monthly_reset_id(org.id, next_month), True)
    assert (await handle.describe()).id == started.workflow_id
    await handle.terminate(reason="test: probe only")


async def test_a_reset_workflow_for_a_month_not_begun_fails_at_once_without_retrying(
    pool: AsyncConnectionPool, client: Client, settings: Settings, worker: object
) -> None:
    org = await make_org(pool)
    # Started past the client-side check, as a buggy caller could: the activity's input is refused.
    handle = await client.start_workflow(
        MonthlyResetWorkflow.run,
        MonthlyResetInput(org_id=org.id, month="2099-01"),
        id=f"monthly-reset-test-{uuid.uuid4()}",
        task_queue=settings.task_queue,
        result_type=MonthlyResetResult,
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause.cause  # WorkflowFailure <- ActivityError <- ApplicationError
    assert isinstance(cause, ApplicationError)
    assert cause.type == INPUT_ERROR and cause.non_retryable
    assert "month 2099-01 has not begun" in cause.message
    history = await handle.fetch_history()
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert attempts == [1]
    assert (
        await fetch_value(pool, "SELECT count(*) FROM monthly_resets WHERE organization_id = %s", [org.id])
        == 0
    )


# --- 2. Flags against the month open when they are written ----------------------------------------


async def _wait_until_waiting_on_a_lock(pool: AsyncConnectionPool, pid: int) -> None:
    """Return once backend ``pid`` waits on a lock (its state, not a timing guess)."""
    for _ in range(600):
        waiting = await fetch_value(
            pool, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", [pid]
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"backend {pid} never waited on a lock")


async def test_a_sync_blocked_while_the_reset_commits_flags_against_the_month_the_reset_opened(
    pool: AsyncConnectionPool, database_url: str
) -> None:
    org = await make_org(pool, projects=2)
    a, b = org.project_ids
    await _open_month(pool, org.id, date(2026, 10, 1))
    day = datetime(2026, 10, 20, tzinfo=UTC)
    under = await _stage(pool, [row(a, "task.created", day, 990, updated_at=day + timedelta(hours=1))])
    over = await _stage(pool, [row(a, "task.created", day, 1500, updated_at=day + timedelta(hours=2))])
    syncing, holding, resetting = [await _session(database_url, NOV_15) for _ in range(3)]
    async with syncing, holding, resetting:
        async with syncing.transaction():
            await syncing.execute(query("apply_usage_batch"), {"batch_id": under})
        assert await flags(pool, org.id) == []
        sync_pid = syncing.info.backend_pid

        async def apply_over() -> None:
            async with syncing.transaction():
                await syncing.execute(query("apply_usage_batch"), {"batch_id": over})

        # The batch reads October as the open month, then waits on the checkpoint held here; the
        # reset of November commits meanwhile (0 flags); then the batch goes on.
        async with holding.transaction():
            await holding.execute(
                "SELECT 1 FROM counter_checkpoints WHERE project_id = %s AND tag = 'task.created'"
                " AND row_created_at = %s FOR UPDATE",
                [a, day],
            )
            applying = asyncio.create_task(apply_over())
            await _wait_until_waiting_on_a_lock(pool, sync_pid)
            closed = await (
                await resetting.execute("SELECT * FROM close_org_month(%s, '2026-11-01')", [org.id])
            ).fetchone()
            assert closed is not None and (closed["claimed"], closed["flags"]) == (True, 0)
        await applying

    # October's 1,500 stays in October and never flags the org in November.
    assert await org_usage(pool, org.id, "task.created", date(2026, 10, 1)) == 1500
    assert await flags(pool, org.id) == []
    # November's own usage still flags it, against November.
    november = datetime(2026, 11, 2, tzinfo=UTC)
    crossing = await _stage(
        pool, [row(b, "task.created", november, 1001, updated_at=november + timedelta(hours=1))]
    )
    conn = await _session(database_url, NOV_15)
    async with conn, conn.transaction():
        await conn.execute(query("apply_usage_batch"), {"batch_id": crossing})
    assert await flags(pool, org.id) == sorted(
        [(a, "task.created", "over_limit"), (b, "task.created", "over_limit")]
    )
    assert await fetch_value(
        pool, "SELECT array_agg(DISTINCT month) FROM quota_flags WHERE organization_id = %s", [org.id]
    ) == [date(2026, 11, 1)]


# --- 3. Resets that recover; pushes that say what they held back ------------------------------------


async def test_a_push_during_a_failed_reset_is_503_and_the_same_body_applies_once_billing_reset_reran_it(
    http: httpx.AsyncClient, pool: AsyncConnectionPool, client: Client, settings: Settings
) -> None:
    org = await make_org(pool)
    project = org.project_ids[0]
    now = utc_now()
    this_month, last_month = month_start(now), month_start(last_month_day(now))
    old_day, today = last_month_day(now), day_start(now)
    await _open_month(pool, org.id, last_month)
    failing = f"fail_reset_{org.id.replace('-', '')[:12]}"
    async with pool.connection() as conn:
        await conn.execute(
            f"CREATE FUNCTION {failing}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.organization_id = '{org.id}' THEN RAISE EXCEPTION 'injected reset failure'; END IF; "
            "RETURN NEW; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER {failing} BEFORE INSERT ON monthly_resets FOR EACH ROW EXECUTE FUNCTION {failing}()"
        )
    reset_id = monthly_reset_id(org.id, month_key(this_month))
    try:
        # The reset fails and an operator terminates it: it did not complete.
        await start_monthly_reset(client, settings.task_queue, org.id, month_key(this_month))
        await client.get_workflow_handle(reset_id).terminate("gave up on it")
        http._transport.app.state.reset_wait_seconds = 1.0  # type: ignore[attr-defined]
        rows = [
            row(project, "task.created", old_day, 40, updated_at=old_day + timedelta(hours=1)),
            row(project, "task.created", today, 6, updated_at=min(today + timedelta(seconds=1), now)),
        ]
        response = await http.post("/v1/metrics", json={"metrics": rows})
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "60"
        body = response.json()
        assert set(body) == {"quota", "rejected", "held_back", "batch_id"}
        assert body["rejected"] == []
        assert [(h["org_id"], h["month"]) for h in body["held_back"]] == [(org.id, month_key(this_month))]
        assert "did not complete within 1 s" in body["held_back"][0]["reason"]
        # Only the row of the month not yet opened is held back; last month's applies now.
        assert await org_usage(pool, org.id, "task.created", last_month) == 40
        assert await org_usage(pool, org.id, "task.created", this_month) == 0
        # The push ran the reset again (its run had not completed); it still fails: terminate it too.
        description = await client.get_workflow_handle(reset_id).describe()
        assert description.status == WorkflowExecutionStatus.RUNNING
        await client.get_workflow_handle(reset_id).terminate("still failing")
    finally:
        async with pool.connection() as conn:
            await conn.execute(f"DROP TRIGGER {failing} ON monthly_resets")
            await conn.execute(f"DROP FUNCTION {failing}()")

    done = await _billing(settings, "reset", org.id, "--month", month_key(this_month))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{reset_id}: done (rerun: the previous run did not complete); closed ")
    again = await _billing(settings, "reset", org.id, "--month", month_key(this_month))
    assert again.stdout.strip() == f"{reset_id}: already done"

    applied = await push(http, rows)
    assert set(applied) == {"quota", "rejected"} and applied["rejected"] == []
    assert await org_usage(pool, org.id, "task.created", last_month) == 40
    assert await org_usage(pool, org.id, "task.created", this_month) == 6
    ledger = await fetch_value(
        pool, "SELECT sum(delta) FROM usage_ledger WHERE organization_id = %s", [org.id]
    )
    assert ledger == 46
    before = await usage_snapshot(pool)
    assert await push(http, rows) == applied  # the same body a third time: nothing changes
    assert await usage_snapshot(pool) == before


async def test_out_of_range_times_and_control_characters_in_tags_are_rejected_rows(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool)
    project = org.project_ids[0]
    good = row(project, "task.created", day_start(utc_now()), 5)
    bad = [
        {**good, "created_at": "1900-01-01T00:00:00Z"},
        {**good, "created_at": "0001-01-01T00:00:00+01:00"},  # year 0 in UTC
        {**good, "created_at": "9999-12-31T23:59:59-14:00", "updated_at": "9999-12-31T23:59:59-14:00"},
        {**good, "updated_at": "9999-12-31T23:59:59+00:00"},
        {**good, "tag": "task.created\x00"},
        {**good, "tag": "task\x07created"},
        {**good, "tag": "t" * 10_000},
    ]
    before = await usage_snapshot(pool)
    answer = await push(http, bad)
    assert answer["rejected"] == [
        {"index": 0, "reason": "created_at is before 2000-01-01: '1900-01-01T00:00:00Z'"},
        {"index": 1, "reason": "created_at is not between 2000-01-01 and now: '0001-01-01T00:00:00+01:00'"},
        {"index": 2, "reason": "created_at is not between 2000-01-01 and now: '9999-12-31T23:59:59-14:00'"},
        {"index": 3, "reason": "updated_at is in the future"},
        {"index": 4, "reason": "tag must not contain control characters (found U+0000): 'task.created\\x00'"},
        {"index": 5, "reason": "tag must not contain control characters (found U+0007): 'task\\x07created'"},
        {"index": 6, "reason": f"tag is longer than 200 characters: '{'t' * 76}..."},
    ]
    assert await usage_snapshot(pool) == before


async def test_a_push_answers_503_within_its_bound_and_the_same_body_later_reads_back_the_same_run(
    pool: AsyncConnectionPool, database_url: str, client: Client
) -> None:
    settings = make_settings(database_url, client, BILLING_PUSH_ANSWER_SECONDS="1")
    org = await make_org(pool)
    rows = [row(org.project_ids[0], "task.created", day_start(utc_now()), 3)]
    batch_id = parse_metrics(rows).batch_id
    app = create_app(settings, pool, client)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://billing.test",
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=120,
    ) as http_client:
        # No worker polls this task queue yet, so the batch's run cannot finish.
        first = await http_client.post("/v1/metrics", json={"metrics": rows})
        assert first.status_code == 503, first.text
        assert first.headers["retry-after"] == "60"
        body = first.json()
        assert body["batch_id"] == batch_id
        assert body["held_back"] == [
            {
                "org_id": None,
                "month": None,
                "reason": f"usage-sync/{batch_id} did not finish within 1 s; it is still running",
            }
        ]
        assert await org_usage(pool, org.id, "task.created", month_start(utc_now())) == 0
        run = await client.get_workflow_handle(usage_sync_id(batch_id)).describe()
        async with running_worker(settings, pool, client):
            second = await http_client.post("/v1/metrics", json={"metrics": rows})
        assert second.status_code == 200, second.text
    assert await org_usage(pool, org.id, "task.created", month_start(utc_now())) == 3
    again = await client.get_workflow_handle(usage_sync_id(batch_id)).describe()
    assert again.run_id == run.run_id and again.status == WorkflowExecutionStatus.COMPLETED
