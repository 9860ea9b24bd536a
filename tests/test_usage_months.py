"""Month boundaries, monthly resets racing syncs, failing resets, and quota flags across months."""

from __future__ import annotations

import asyncio
from datetime import date, timedelta

import httpx
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from billing.core.config import Settings
from billing.domain.ids import usage_sync_id
from billing.domain.months import month_key
from billing.models import MonthlyResetResult
from billing.models.usage_sync import UsageSyncResult
from billing.orchestration.temporal import start_monthly_reset
from billing.orchestration.usage_batches import batch_id_of
from tests.factories import fetch_value, make_org
from tests.usage_support import (
    ALL_TAGS,
    day_start,
    flags,
    http,
    last_month_day,
    month_start,
    org_usage,
    push,
    row,
    utc_now,
)

__all__ = ["http"]


async def open_month(pool: AsyncConnectionPool, org_id: str, month: date) -> None:
    """Record that the org's month was opened (as its reset, or its first sync, would have)."""
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO monthly_resets (organization_id, month) VALUES (%s, %s)", [org_id, month]
        )


async def closed_task_usage(pool: AsyncConnectionPool, org_id: str) -> object:
    """The org's ``task.created`` in the snapshot its monthly reset took of the month it closed."""
    return await fetch_value(
        pool,
        "SELECT value FROM closed_month_usage WHERE organization_id = %s AND tag = 'task.created'",
        [org_id],
    )


async def test_syncs_racing_the_monthly_reset_lose_nothing_and_keep_last_months_growth_there(
    http: httpx.AsyncClient, pool: AsyncConnectionPool, client: Client, settings: Settings
) -> None:
    org = await make_org(pool, projects=2)
    a, b = org.project_ids
    now = utc_now()
    this_month, last_month = month_start(now), month_start(last_month_day(now))
    old_day, today = last_month_day(now), day_start(now)
    await open_month(pool, org.id, last_month)
    await push(http, [row(a, "task.created", old_day, 100, updated_at=old_day + timedelta(hours=1))])
    assert await org_usage(pool, org.id, "task.created", last_month) == 100

    # The monthly close starts the reset while two syncs carry late growth of last month and this
    # month's first rows; the syncs wait for the reset before applying this month's rows.
    first = [
        row(a, "task.created", old_day, 130, updated_at=old_day + timedelta(hours=2)),
        row(b, "task.created", today, 5, updated_at=today + timedelta(seconds=1)),
    ]
    second = [
        row(a, "task.created", old_day, 150, updated_at=old_day + timedelta(hours=3)),
        row(b, "task.created", today, 9, updated_at=min(today + timedelta(seconds=2), now)),
        row(a, "task.created", today, 4, updated_at=min(today + timedelta(seconds=2), now)),
    ]
    _, answer_one, answer_two = await asyncio.gather(
        start_monthly_reset(client, settings.task_queue, org.id, month_key(this_month)),
        push(http, first),
        push(http, second),
    )
    reset = await client.get_workflow_handle(
        f"monthly-reset/{org.id}/{month_key(this_month)}", result_type=MonthlyResetResult
    ).result()
    assert reset.claimed
    assert set(answer_one) == set(answer_two) == {"quota", "rejected"}
    assert await org_usage(pool, org.id, "task.created", last_month) == 150
    assert await org_usage(pool, org.id, "task.created", this_month) == 13
    closed = await closed_task_usage(pool, org.id)
    # The snapshot at close is last month as it stood then: a sync applies the rows of the month open
    # for the org at once and holds back only this month's until the reset completed, so each sync's
    # late growth landed before or after the close (claim and close are one transaction), never half.
    assert closed in (100, 130, 150)
    claims = await fetch_value(
        pool, "SELECT count(*) FROM monthly_resets WHERE organization_id = %s", [org.id]
    )
    assert claims == 2

    # Growth arriving after the close still lands in last month, never in this one.
    await push(http, [row(a, "task.created", old_day, 170, updated_at=old_day + timedelta(hours=4))])
    assert await org_usage(pool, org.id, "task.created", last_month) == 170
    assert await org_usage(pool, org.id, "task.created", this_month) == 13
    ledger = await fetch_value(
        pool, "SELECT sum(delta) FROM usage_ledger WHERE organization_id = %s", [org.id]
    )
    assert ledger == 170 + 13


async def test_an_org_whose_reset_fails_is_held_back_with_503_and_a_repush_applies_it(
    http: httpx.AsyncClient, pool: AsyncConnectionPool, client: Client, settings: Settings
) -> None:
    failing, healthy = await make_org(pool), await make_org(pool)
    now = utc_now()
    this_month, last_month = month_start(now), month_start(last_month_day(now))
    today = day_start(now)
    for org in (failing, healthy):
        await open_month(pool, org.id, last_month)
    trigger_function = f"fail_reset_{failing.id.replace('-', '')[:12]}"
    async with pool.connection() as conn:
        # A real failure of the reset's transaction for one org only.
        await conn.execute(
            f"CREATE FUNCTION {trigger_function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.organization_id = '{failing.id}' THEN RAISE EXCEPTION 'injected reset failure'; END IF; "
            "RETURN NEW; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER {trigger_function} BEFORE INSERT ON monthly_resets "
            f"FOR EACH ROW EXECUTE FUNCTION {trigger_function}()"
        )
    # The healthy org's reset is done before the push, so the push needs none for it and the wait
    # below is only the failing org's (whose reset cannot complete while the trigger is there).
    done = await start_monthly_reset(client, settings.task_queue, healthy.id, month_key(this_month))
    assert (await client.get_workflow_handle(done.workflow_id, result_type=MonthlyResetResult).result()).claimed
    http_app = http._transport.app  # type: ignore[attr-defined]
    http_app.state.reset_wait_seconds = 2.0
    rows = [
        row(failing.project_ids[0], "task.created", today, 7, updated_at=today + timedelta(seconds=1)),
        row(healthy.project_ids[0], "task.created", today, 11, updated_at=today + timedelta(seconds=1)),
    ]
    try:
        response = await http.post("/v1/metrics", json={"metrics": rows})
    finally:
        async with pool.connection() as conn:
            await conn.execute(f"DROP TRIGGER {trigger_function} ON monthly_resets")
            await conn.execute(f"DROP FUNCTION {trigger_function}()")

    # Not fully applied: 503 with Retry-After and the same body, plus what was held back and why.
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "60"
    answer = response.json()
    assert [held["org_id"] for held in answer["held_back"]] == [failing.id]
    assert answer["held_back"][0]["month"] == month_key(this_month)
    assert "did not complete within 2 s" in answer["held_back"][0]["reason"]
    assert answer["rejected"] == []
    assert len(answer["quota"]) == 10
    assert "skipped" not in answer
    assert await org_usage(pool, healthy.id, "task.created", this_month) == 11
    assert await org_usage(pool, failing.id, "task.created", this_month) == 0
    checkpoints = await fetch_value(
        pool, "SELECT count(*) FROM counter_checkpoints WHERE project_id = %s", [failing.project_ids[0]]
    )
    assert checkpoints == 0

    # The reset's own retries succeed now that the failure is gone; the same push again applies the
    # skipped org only (the healthy one is not counted twice).
    reset = await client.get_workflow_handle(
        f"monthly-reset/{failing.id}/{month_key(this_month)}", result_type=MonthlyResetResult
    ).result()
    assert reset.claimed
    again = await push(http, rows)
    assert set(again) == {"quota", "rejected"}
    assert await org_usage(pool, failing.id, "task.created", this_month) == 7
    assert await org_usage(pool, healthy.id, "task.created", this_month) == 11


async def test_a_free_org_over_its_limit_is_flagged_until_the_next_months_reset(
    http: httpx.AsyncClient, pool: AsyncConnectionPool, client: Client, settings: Settings
) -> None:
    org = await make_org(pool, projects=2)
    a, b = org.project_ids
    now = utc_now()
    this_month, last_month = month_start(now), month_start(last_month_day(now))
    old_day = last_month_day(now)
    await open_month(pool, org.id, last_month)
    answer = await push(http, [row(a, "space.learned", old_day, 101)])  # the free limit is 100
    assert await flags(pool, org.id) == sorted(
        [(a, "space.learned", "over_limit"), (b, "space.learned", "over_limit")]
    )
    assert {(q["project_id"], q["tag"]) for q in answer["quota"] if q["excess"]} == {(a, "space.learned")}

    outcome = await start_monthly_reset(client, settings.task_queue, org.id, month_key(this_month))
    await client.get_workflow_handle(outcome.workflow_id).result()
    assert await flags(pool, org.id) == []
    # Late growth of the closed month stays there and does not count against the new month.
    late = await push(http, [row(a, "space.learned", old_day, 180, updated_at=old_day + timedelta(hours=5))])
    assert await org_usage(pool, org.id, "space.learned", last_month) == 180
    assert await flags(pool, org.id) == []
    assert not any(q["excess"] for q in late["quota"])
    outbox = await fetch_value(
        pool, "SELECT count(*) FROM stripe_report_outbox WHERE organization_id = %s", [org.id]
    )
    assert outbox == 0  # free plans are never billed


async def test_a_blocked_org_has_every_tag_of_every_project_flagged(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool, plan="pro", projects=3, payment_status="blocked")
    today = day_start(utc_now())
    answer = await push(http, [row(org.project_ids[0], "task.created", today, 1)])
    expected = sorted((project, tag, "payment_blocked") for project in org.project_ids for tag in ALL_TAGS)
    assert await flags(pool, org.id) == expected
    assert answer["quota"] == [
        {"project_id": org.project_ids[0], "tag": tag, "excess": True} for tag in ALL_TAGS
    ]


async def test_a_new_orgs_first_push_opens_this_month_without_a_reset(
    http: httpx.AsyncClient, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await make_org(pool)
    now = utc_now()
    await push(
        http,
        [
            row(org.project_ids[0], "task.created", day_start(now), 3),
            row(org.project_ids[0], "task.created", last_month_day(now), 8),
        ],
    )
    claimed = await fetch_value(
        pool, "SELECT array_agg(month) FROM monthly_resets WHERE organization_id = %s", [org.id]
    )
    assert claimed == [month_start(now)]
    assert await org_usage(pool, org.id, "task.created", month_start(now)) == 3
    assert await org_usage(pool, org.id, "task.created", month_start(last_month_day(now))) == 8
    # Asked by ID (consistent), not through the visibility index, which lags and would pass vacuously.
    with pytest.raises(RPCError) as missing:
        await client.get_workflow_handle(f"monthly-reset/{org.id}/{month_key(now)}").describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND


def _apply_rows_counted() -> dict[str, float]:
    """``billing_usage_apply_rows_total`` of this process (the tests' worker runs in it), by outcome."""
    return {
        outcome: REGISTRY.get_sample_value("billing_usage_apply_rows_total", {"outcome": outcome}) or 0.0
        for outcome in ("applied", "rejected", "held_back")
    }


async def _sync_of(client: Client, rows: list[dict[str, object]]) -> tuple[UsageSyncResult, list[str]]:
    """The result of the push of ``rows`` and the activities its ``usage-sync`` run ran, in order."""
    handle = client.get_workflow_handle(usage_sync_id(batch_id_of(rows)), result_type=UsageSyncResult)
    history = await handle.fetch_history()
    ran = [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.HasField("activity_task_scheduled_event_attributes")
    ]
    return await handle.result(), ran


async def test_a_batch_of_open_months_only_runs_no_reset_check(
    http: httpx.AsyncClient, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await make_org(pool)
    now = utc_now()
    await open_month(pool, org.id, month_start(now))
    rows = [row(org.project_ids[0], "task.created", day_start(now), 7)]
    await push(http, rows)
    result, ran = await _sync_of(client, rows)
    assert ran == ["apply_usage_batch", "apply_usage_batch"]  # the two parts, side by side
    assert (result.rows_applied, result.resets_started, result.orgs_skipped) == (1, 0, 0)


async def test_a_batch_reaching_a_new_month_applies_the_open_one_then_opens_the_new_one_and_applies_it(
    http: httpx.AsyncClient, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await make_org(pool)
    project = org.project_ids[0]
    now = utc_now()
    this_month, last_month = month_start(now), month_start(last_month_day(now))
    old_day, today = last_month_day(now), day_start(now)
    await open_month(pool, org.id, last_month)
    await push(http, [row(project, "task.created", old_day, 100, updated_at=old_day + timedelta(hours=1))])

    rows = [
        row(project, "task.created", old_day, 130, updated_at=old_day + timedelta(hours=2)),
        row(project, "task.created", today, 6),
    ]
    counted_before = _apply_rows_counted()
    await push(http, rows)
    result, ran = await _sync_of(client, rows)
    # The first apply (both parts) takes last month's growth and holds this month's row back; only
    # then is the reset check run (it starts the reset and waits for it), and the part that held the
    # row back is applied again.
    assert ran == ["apply_usage_batch"] * 2 + ["ensure_batch_resets"] + ["apply_usage_batch"]
    assert (result.rows_applied, result.rows_pending, result.resets_started, result.orgs_skipped) == (2, 0, 1, 0)
    # What each apply did, not the running totals its answer carries: 1 row, then 1 held, then 1.
    counted = {key: value - counted_before[key] for key, value in _apply_rows_counted().items()}
    assert counted == {"applied": 2, "rejected": 0, "held_back": 1}
    assert await org_usage(pool, org.id, "task.created", last_month) == 130
    assert await org_usage(pool, org.id, "task.created", this_month) == 6
    closed = await closed_task_usage(pool, org.id)
    assert closed == 130  # the late growth came in before the close
    ledger = await fetch_value(pool, "SELECT sum(delta) FROM usage_ledger WHERE organization_id = %s", [org.id])
    assert ledger == 130 + 6
    skips = await fetch_value(pool, "SELECT count(*) FROM usage_batch_skips WHERE organization_id = %s", [org.id])
    assert skips == 0
