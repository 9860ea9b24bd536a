"""Notifications to the product: exactly once per crossing however syncs race, delivered signed
(Standard Webhooks) by ``notify/{id}`` through a receiver that refuses its first attempts; payment
and plan changes notified from the billing-row write; listed by `billing notifications` and the API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from temporalio.client import Client

from api.app import create_app
from billing.adapters.notification_delivery import Dispatcher, body_of, signed_headers
from billing.core.clock import utcnow
from billing.core.config import Settings
from billing.models.notify import DeliveryResult, NotifyInput
from billing.testing.scratch import VENV_BIN
from tests.conftest import API_TOKEN, make_settings, running_worker
from tests.factories import make_org
from tests.notify_receiver import Receiver
from tests.usage_support import day_start, push, row, utc_now
from workflows.notify import NotifyWorkflow

SECRET = "whsec_" + base64.b64encode(b"notify-secret-of-the-tests-0123").decode()
TAG = "task.created"  # free includes 1,000; team 250,000


async def _notes(pool: AsyncConnectionPool, org_id: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (
            await conn.execute(
                "SELECT id, webhook_id, kind, payload, state, attempts, last_error FROM notifications"
                " WHERE organization_id = %s ORDER BY id",
                [org_id],
            )
        ).fetchall()


@contextlib.asynccontextmanager
async def _api(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        running_worker(settings, pool, client),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(settings, pool, client)),
            base_url="http://billing.test",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=120,
        ) as http,
    ):
        yield http


async def _wait_for_lock_waiters(pool: AsyncConnectionPool, count: int) -> None:
    """Until ``count`` applies of usage batches wait for a row lock."""
    deadline = time.monotonic() + 60
    while True:
        async with pool.connection() as conn:
            waiting = await (
                await conn.execute(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%%apply_usage_batch%%'"
                )
            ).fetchone()
        assert waiting is not None
        if waiting["n"] >= count:
            return
        assert time.monotonic() < deadline, f"only {waiting['n']} applies wait for the lock"
        await asyncio.sleep(0.05)


async def _billing(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "billing"),
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_each_crossing_is_notified_once_under_racing_pushes_and_delivered_through_refusals(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await make_org(pool, plan="free", projects=3)
    a, b, c = org.project_ids
    # Rows stamped now: a default updated_at after created_at could lie in the future early in a day.
    now = utc_now()
    today = day_start(now)
    with Receiver(refuse_first=2) as receiver:
        settings = make_settings(
            database_url,
            client,
            BILLING_NOTIFY_URL=receiver.url,
            BILLING_NOTIFY_SECRET=SECRET,
            BILLING_NOTIFY_RETRY_SECONDS="0.2",
        )
        async with _api(settings, pool, client) as http:
            await push(http, [row(a, TAG, today, 700, updated_at=now)])  # 70 % of 1,000: no threshold reached
            assert await _notes(pool, org.id) == []

            # Two batches that each reach 80 %, forced to race: a second connection holds the org's
            # usage row until both applies wait for it.
            first = [row(b, TAG, today, 200, updated_at=now)]
            second = [row(c, TAG, today, 200, updated_at=now)]
            async with await psycopg.AsyncConnection.connect(database_url) as holder:
                async with holder.transaction():
                    await holder.execute(
                        "SELECT 1 FROM org_usage WHERE organization_id = %s FOR UPDATE", [org.id]
                    )
                    racing = [
                        asyncio.create_task(http.post("/v1/metrics", json={"metrics": rows}))
                        for rows in (first, second)
                    ]
                    await _wait_for_lock_waiters(pool, 2)
            answers = await asyncio.gather(*racing)
            assert [answer.status_code for answer in answers] == [200, 200]
            for rows in (
                first,
                second,
                [row(a, TAG, today, 700, updated_at=now)],
            ):  # pushed again: nothing new
                await push(http, rows)

            deadline = time.monotonic() + 60
            while {note["state"] for note in await _notes(pool, org.id)} != {"delivered"}:
                assert time.monotonic() < deadline, await _notes(pool, org.id)
                await asyncio.sleep(0.1)

    notes = await _notes(pool, org.id)
    month = f"{today:%Y-%m}"
    assert [(n["kind"], n["payload"]["meter"], n["payload"]["threshold_percent"]) for n in notes] == [
        ("usage.threshold_crossed", TAG, 80),
        ("usage.threshold_crossed", TAG, 100),
    ]
    assert [n["payload"]["month"] for n in notes] == [month, month]
    assert [n["payload"]["included"] for n in notes] == [1000, 1000]
    assert [n["attempts"] for n in notes] == [3, 3]

    # Each message: two refusals then one acceptance, always the same webhook-id and body, signed.
    for note in notes:
        mine = [r for r in receiver.requests if r.headers["webhook-id"] == note["webhook_id"]]
        assert [r.status for r in mine] == [503, 503, 204]
        assert len({r.body for r in mine}) == 1
        verified = Webhook(SECRET).verify(mine[-1].body, mine[-1].headers)
        assert verified["type"] == "usage.threshold_crossed"
        assert verified["data"]["org_id"] == org.id
        assert verified["data"]["threshold_percent"] == note["payload"]["threshold_percent"]
    assert len(receiver.accepted()) == 2


async def test_a_signed_payload_verifies_and_a_tampered_one_does_not() -> None:
    body = body_of(
        {
            "kind": "plan.changed",
            "created_at": utcnow(),
            "payload": {"org_id": "x", "from": "free", "to": "pro"},
        }
    )
    headers = signed_headers(SECRET, "msg_1", utcnow(), body)
    assert Webhook(SECRET).verify(body, headers)["data"]["to"] == "pro"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace("pro", "team"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, {**headers, "webhook-id": "msg_2"})


async def test_payment_and_plan_changes_are_notified_once_each_and_recorded_when_delivery_is_off(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await make_org(pool, plan="free")  # created free and ok: nothing to tell
    assert await _notes(pool, org.id) == []
    async with pool.connection() as conn:
        for statement, params in [
            (
                "UPDATE organization_billing SET payment_status = 'past_due' WHERE organization_id = %s",
                [org.id],
            ),
            (
                "UPDATE organization_billing SET payment_status = 'past_due' WHERE organization_id = %s",
                [org.id],
            ),
            (
                "UPDATE organization_billing SET payment_status = 'blocked', payment_status_reason = 'metered'"
                " WHERE organization_id = %s",
                [org.id],
            ),
            (
                "UPDATE organization_billing SET payment_status_reason = 'other' WHERE organization_id = %s",
                [org.id],
            ),
            ("UPDATE organization_billing SET payment_status = 'ok' WHERE organization_id = %s", [org.id]),
            ("UPDATE organization_billing SET plan = 'pro' WHERE organization_id = %s", [org.id]),
        ]:
            await conn.execute(statement, params)
    notes = await _notes(pool, org.id)
    assert [(n["kind"], n["payload"]["from"], n["payload"]["to"]) for n in notes] == [
        ("payment.status_changed", "ok", "past_due"),
        ("payment.status_changed", "past_due", "blocked"),
        ("payment.status_changed", "blocked", "ok"),
        ("plan.changed", "free", "pro"),
    ]
    assert notes[1]["payload"]["reason"] == "metered"

    settings = make_settings(database_url, client)  # no BILLING_NOTIFY_URL
    result = await Dispatcher(settings, pool, client, settings.task_queue).dispatch([n["id"] for n in notes])
    assert (result.started, result.not_configured) == (0, 4)
    assert {n["state"] for n in await _notes(pool, org.id)} == {"not_configured"}

    env = {"DATABASE_URL": database_url}
    code, out, _ = await _billing("notifications", org.id, "--json", env=env)
    assert code == 0
    listed = json.loads(out)
    assert [(n["kind"], n["state"]) for n in listed] == [
        ("plan.changed", "not_configured"),
        ("payment.status_changed", "not_configured"),
        ("payment.status_changed", "not_configured"),
        ("payment.status_changed", "not_configured"),
    ]
    code, out, _ = await _billing("notifications", org.id, env=env)
    assert code == 0
    assert "BILLING_NOTIFY_URL not set: not delivered" in out
    assert "plan.changed" in out and "free -> pro" in out
    code, _, err = await _billing("notifications", "not-an-org", env=env)
    assert code == 2 and "billing: error:" in err


async def test_thresholds_are_set_per_plan_and_the_org_shows_its_notifications(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await make_org(pool, plan="team")
    settings = make_settings(database_url, client)
    # Rows stamped now: a default updated_at after created_at could lie in the future early in a day.
    now = utc_now()
    today = day_start(now)
    async with _api(settings, pool, client) as http:
        try:
            bad = await http.put("/v1/plans/team", json={"thresholds": [0]})
            assert bad.status_code == 400 and "between 1 and 1000" in bad.json()["msg"]
            bad = await http.put("/v1/plans/team", json={"thresholds": ["many"]})
            assert bad.status_code == 400
            answer = await http.put("/v1/plans/team", json={"thresholds": [90, 50, 50]})
            assert answer.status_code == 200
            assert answer.json() == {"plan": "team", "limits": {}, "thresholds": [50, 90]}
            # 64 % of 250,000 (53 % of 300,000, the limit another test may have set): 50 % only.
            await push(http, [row(org.project_ids[0], TAG, today, 160_000, updated_at=now)])
        finally:
            restored = await http.put("/v1/plans/team", json={"thresholds": [80, 100]})
            assert restored.json()["thresholds"] == [80, 100]
        status = await http.get(f"/v1/orgs/{org.id}")
    notes = await _notes(pool, org.id)
    # Created on team (the dashboard's insert): a plan change from the implied free, then 50 % only.
    assert [(n["kind"], n["payload"].get("to"), n["payload"].get("threshold_percent")) for n in notes] == [
        ("plan.changed", "team", None),
        ("usage.threshold_crossed", None, 50),
    ]
    assert (notes[1]["payload"]["meter"], notes[1]["payload"]["usage"]) == (TAG, 160_000)
    shown = status.json()["notifications"]
    assert [(n["kind"], n["state"]) for n in shown] == [
        ("usage.threshold_crossed", "not_configured"),
        ("plan.changed", "recorded"),
    ]


async def test_a_receiver_that_never_accepts_is_given_up_on_and_recorded_failed(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await make_org(pool)
    async with pool.connection() as conn:
        note = await (
            await conn.execute(
                "INSERT INTO notifications (organization_id, kind, dedup_key, payload)"
                " VALUES (%s, 'plan.changed', %s, %s) RETURNING id",
                [org.id, f"test/{org.id}", json.dumps({"org_id": org.id, "from": "free", "to": "pro"})],
            )
        ).fetchone()
    assert note is not None
    with Receiver(refuse_first=1_000) as receiver:
        settings = make_settings(
            database_url, client, BILLING_NOTIFY_URL=receiver.url, BILLING_NOTIFY_SECRET=SECRET
        )
        async with running_worker(settings, pool, client):
            result = await client.execute_workflow(
                NotifyWorkflow.run,
                NotifyInput(
                    notification_id=note["id"], first_retry_seconds=0.2, give_up_after_hours=3 / 3600
                ),
                id=f"notify/{note['id']}",
                task_queue=settings.task_queue,
                result_type=DeliveryResult,
            )
    assert result.outcome == "failed"
    [stored] = await _notes(pool, org.id)
    assert stored["state"] == "failed"
    assert stored["attempts"] == len(receiver.requests) >= 2
    assert stored["last_error"] == "receiver answered 503"
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
