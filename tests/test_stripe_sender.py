"""Claim, call, record (issue 10) and every queued unit reaches Stripe (issue 9), end to end against real
PostgreSQL, the Temporal dev server and the strict test Stripe server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
import stripe
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

import activities.stripe_reports as stripe_reports
from activities.stripe_reports import StripeReportActivities, idempotency_key
from api.app import create_app
from billing.adapters.stripe_client import make_stripe_client
from billing.core.errors import UserError
from billing.db.pool import configure_session
from billing.db.report_ops import act_on_rows
from billing.models.stripe_report import QueueStorageOverageInput, StripeReportResult
from billing.orchestration.temporal import start_stripe_reports
from billing.read.reconcile import reconcile
from billing.read.status import load_org_status
from billing.testing.stripe_server import FakeStripe, sign_payload
from tests.conftest import API_TOKEN, make_settings, running_worker
from tests.factories import make_org
from tests.report_support import (
    FAST,
    TEST_KEY,
    counted_identifiers,
    meter_event_requests,
    outbox,
    pro_org_with_customer,
    queue_rows,
    report,
    stripe_settings,
    this_hour,
)

METER_EVENTS = "/v1/billing/meter_events"
GIB = 1024**3


async def _rows(pool: AsyncConnectionPool, org_id: str, *columns: str) -> list[tuple[object, ...]]:
    async with pool.connection() as conn:
        cursor = await conn.execute(
            f"SELECT {', '.join(columns)} FROM stripe_report_outbox WHERE organization_id = %s ORDER BY id",
            [org_id],
        )
        return [tuple(row.values()) for row in await cursor.fetchall()]


async def test_slow_calls_outlive_a_short_idle_transaction_timeout_and_hold_no_connection(
    pool: AsyncConnectionPool, client: Client, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hour = this_hour()  # read once: two reads may straddle hh:00
    # Old code: one transaction across the page, killed by the idle timeout before it could commit.
    monkeypatch.setattr(stripe_reports, "_IDLE_IN_TRANSACTION_TIMEOUT", "300ms")
    with FakeStripe() as fake:
        org, _customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [1, 2, 3], hour=hour)
        fake.slow_next(3, 1.0, path_prefix=METER_EVENTS)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            starts = await start_stripe_reports(client, settings.task_queue, [org.id], hour, tuning=FAST)
            # While Stripe holds the second call, no session of the database is inside a transaction
            # (the first row's record may be committing right then: a short autocommit statement).
            assert await asyncio.to_thread(fake.wait_key_in_use, idempotency_key(identifiers[1]))
            async with pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT count(*) AS busy FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%%'"
                )
                busy = (await cursor.fetchone())["busy"]
            assert [r["status"] for r in await outbox(pool, org.id)][1:] == ["sending", "sending"]
            result = await client.get_workflow_handle(
                starts.workflow_ids[0], result_type=StripeReportResult
            ).result()
    assert busy == 0
    assert result.sent == 3
    assert counted_identifiers(fake) == identifiers
    assert meter_event_requests(fake) == identifiers


async def test_a_500_on_the_first_attempt_is_counted_once_under_the_rows_next_key(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: two reads may straddle hh:00
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [7, 8], hour=hour)
        fake.fail_next(1, status=500, path_prefix=METER_EVENTS)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            result = await report(client, settings, org.id, hour=hour)

        assert result.sent == 2
        assert counted_identifiers(fake) == identifiers
        assert fake.total(customer, "agent_tasks") == 15
        keys = [r.idempotency_key for r in fake.requests if r.path == METER_EVENTS]
        assert keys == [
            idempotency_key(identifiers[0]),
            idempotency_key(identifiers[0], 1),
            idempotency_key(identifiers[1]),
        ]
        assert await _rows(pool, org.id, "status", "key_generation", "attempts") == [
            ("sent", 1, 2),
            ("sent", 0, 1),
        ]
        # Stripe stored the 500 under the first key: retrying with it (what the old sender did, for a
        # day) replays the 500 again.
        raw = stripe.StripeClient(TEST_KEY, base_addresses={"api": fake.url}, max_network_retries=0)
        with pytest.raises(stripe.APIError) as replayed:
            raw.v1.billing.meter_events.create(
                {
                    "event_name": "agent_tasks",
                    "identifier": identifiers[0],
                    "timestamp": int(hour.timestamp()),
                    "payload": {"stripe_customer_id": customer, "value": "7"},
                },
                {"idempotency_key": idempotency_key(identifiers[0])},
            )
        assert replayed.value.http_status == 500


async def test_counted_then_killed_and_past_the_horizon_is_uncertain_never_resent_and_settled_by_an_operator(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: two reads may straddle hh:00
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        counted, waiting = await queue_rows(pool, org.id, [5, 6], hour=hour)
        # A worker claimed the first row, Stripe counted it, and the worker died before the record;
        # then the database was unavailable past the horizon (the first attempt is backdated 21 h).
        async with pool.connection() as conn:
            claimed = await (
                await conn.execute(
                    "SELECT * FROM report_claim(%s, 1, %s, interval '2 minutes', interval '1 hour')",
                    [org.id, str(uuid.uuid4())],
                )
            ).fetchall()
        assert [row["identifier"] for row in claimed] == [counted]
        raw = stripe.StripeClient(TEST_KEY, base_addresses={"api": fake.url}, max_network_retries=0)
        raw.v1.billing.meter_events.create(
            {
                "event_name": "agent_tasks",
                "identifier": counted,
                "timestamp": int(claimed[0]["sent_timestamp"].timestamp()),
                "payload": {"stripe_customer_id": customer, "value": "5"},
            },
            {"idempotency_key": claimed[0]["idempotency_key"]},
        )
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE stripe_report_outbox SET first_attempt_at = first_attempt_at - interval '21 hours',"
                " lease_until = billing_now() - interval '1 second' WHERE identifier = %s",
                [counted],
            )
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            result = await report(client, settings, org.id, hour=hour)

        # Never resent: one request for it ever (the one before the crash); the other row was sent.
        assert meter_event_requests(fake) == [counted, waiting]
        assert counted_identifiers(fake) == [counted, waiting]
        assert (result.sent, result.uncertain, result.pending) == (1, 1, 0)
        assert "1 uncertain (past the horizon: run billing reconcile)" in result.outcome
        rows = await outbox(pool, org.id)
        assert [r["status"] for r in rows] == ["uncertain", "sent"]
        assert rows[0]["status_reason"].startswith("not settled within 20:00:00 of its first attempt")
        status = await load_org_status(pool, org.id, f"{hour:%Y-%m}", stripe_configured=True)
        assert status is not None
        assert [(r.status, r.reports, r.quantity) for r in status.stripe_reports] == [
            ("sent", 1, 6),
            ("uncertain", 1, 5),
        ]
        stripe_client = make_stripe_client(settings)
        assert stripe_client is not None
        before = await reconcile(pool, stripe_client, org.id, f"{hour:%Y-%m}")
        agent = next(m for m in before.meters if m.event_name == "agent_tasks")
        # Stripe has 5 more than the sent rows: exactly the uncertain row, listed apart.
        assert (agent.ledger, agent.stripe, agent.difference) == (6, 11, 5)
        assert [(u["identifier"], u["quantity"]) for u in before.uncertain] == [(counted, 5)]
        assert (before.unsettled_units, before.matches) == (5, False)

        with pytest.raises(UserError, match="mark-sent applies to uncertain rows only"):
            await act_on_rows(pool, org.id, [waiting], "mark_sent", actor="ops", reason="looks counted")
        await act_on_rows(
            pool, org.id, [counted], "mark_sent", actor="ops", reason="reconcile: Stripe has it"
        )
        after = await reconcile(pool, stripe_client, org.id, f"{hour:%Y-%m}")
        assert after.matches
        assert [(q.state, q.quantity) for q in after.queued] == [("sent", 11)]
        status = await load_org_status(pool, org.id, f"{hour:%Y-%m}", stripe_configured=True)
        assert status is not None
        assert [
            (a["action"], a["actor"], a["reason"], a["from_status"]) for a in status.stripe_report_actions
        ] == [("mark_sent", "ops", "reconcile: Stripe has it", "uncertain")]


async def test_a_configuration_refusal_leaves_every_row_pending_then_drains_once_the_meter_exists(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: two reads may straddle hh:00
    with FakeStripe() as fake:
        org, _customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [1, 2, 3], hour=hour)
        fake.remove_meter("agent_tasks")
        before = (
            REGISTRY.get_sample_value("billing_stripe_configuration_refusals_total", {"reason": "no_answer"})
            or 0.0
        )
        refused = (
            REGISTRY.get_sample_value("billing_stripe_configuration_refusals_total", {"reason": "400"}) or 0.0
        )
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            starts = await start_stripe_reports(client, settings.task_queue, [org.id], hour, tuning=FAST)
            for _ in range(400):
                if fake.request_counts[METER_EVENTS] >= 3:
                    break
                await asyncio.sleep(0.05)
            assert fake.wait_idle()
            rows = await outbox(pool, org.id)
            assert {r["status"] for r in rows} <= {"pending", "sending"}
            assert rows[0]["status_reason"] == (
                "will retry: Stripe configuration: No active meter was found for event_name 'agent_tasks'."
            )
            assert fake.meter_events == []
            fake.add_meter("agent_tasks")
            result = await client.get_workflow_handle(
                starts.workflow_ids[0], result_type=StripeReportResult
            ).result()
        assert (result.sent, result.failed) == (3, 0)
        assert counted_identifiers(fake) == identifiers
        assert [r["status"] for r in await outbox(pool, org.id)] == ["sent"] * 3
        after = (
            REGISTRY.get_sample_value("billing_stripe_configuration_refusals_total", {"reason": "400"}) or 0.0
        )
        assert after - refused >= 3
        assert before == (
            REGISTRY.get_sample_value("billing_stripe_configuration_refusals_total", {"reason": "no_answer"})
            or 0.0
        )


async def test_a_failed_row_is_sent_again_by_an_operator_under_a_derived_identifier_and_a_void_is_recorded(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: two reads may straddle hh:00
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        failing, kept, written_off = await queue_rows(pool, org.id, [4, 5, 6], hour=hour)
        fake.fail_next(1, status=400, path_prefix=METER_EVENTS)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            # The third row is written off before any send: the only way a queued row is not sent.
            voided = await act_on_rows(
                pool, org.id, [written_off], "void", actor="ops", reason="duplicate usage"
            )
            assert [v.identifier for v in voided] == [written_off]
            first = await report(client, settings, org.id, hour=hour)
            assert (first.sent, first.failed) == (1, 1)
            with pytest.raises(UserError, match="has no report row 'nope'"):
                await act_on_rows(pool, org.id, [failing, "nope"], "resend", actor="ops", reason="fixed")
            with pytest.raises(UserError, match="is sent; resend applies to failed, uncertain rows only"):
                await act_on_rows(pool, org.id, [kept], "resend", actor="ops", reason="again")
            again = await act_on_rows(pool, org.id, [failing], "resend", actor="ops", reason="value fixed")
            assert [(a.identifier, a.new_identifier) for a in again] == [(failing, f"{failing}-r1")]
            second = await report(client, settings, org.id, hour=hour - timedelta(hours=1))
        assert second.sent == 1
        assert counted_identifiers(fake) == [kept, f"{failing}-r1"]
        assert fake.total(customer, "agent_tasks") == 9
        assert await _rows(pool, org.id, "identifier", "status", "previous_identifiers") == [
            (f"{failing}-r1", "sent", [failing]),
            (kept, "sent", []),
            (written_off, "voided", []),
        ]
        status = await load_org_status(pool, org.id, f"{hour:%Y-%m}", stripe_configured=True)
        assert status is not None
        assert [(r.status, r.reports, r.quantity) for r in status.stripe_reports] == [
            ("sent", 2, 9),
            ("voided", 1, 6),
        ]
        assert [
            (a["action"], a["old_identifier"], a["new_identifier"]) for a in status.stripe_report_actions
        ] == [
            ("resend", failing, f"{failing}-r1"),
            ("void", written_off, None),
        ]
        stripe_client = make_stripe_client(settings)
        assert stripe_client is not None
        result = await reconcile(pool, stripe_client, org.id, f"{hour:%Y-%m}")
        assert result.matches
        assert [(q.state, q.quantity) for q in result.queued] == [("sent", 9), ("voided", 6)]


async def test_a_meter_error_notification_is_recorded_counted_and_shown_in_status(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: two reads may straddle hh:00
    secret = "whsec_meter_errors"
    with FakeStripe() as fake:
        org, _customer = await pro_org_with_customer(pool, fake)
        (identifier,) = await queue_rows(pool, org.id, [3], hour=hour)
        settings = stripe_settings(database_url, client, fake, STRIPE_WEBHOOK_SECRET=secret)
        async with running_worker(settings, pool, client):
            await report(client, settings, org.id, hour=hour)
        app = create_app(settings, pool, client)
        body = fake.meter_error_notification(
            "agent_tasks",
            code="meter_event_customer_not_found",
            message="No customer found for the event.",
            identifiers=[idempotency_key(identifier)],
        )
        counted = (
            REGISTRY.get_sample_value(
                "billing_stripe_meter_errors_total", {"type": "v1.billing.meter.error_report_triggered"}
            )
            or 0.0
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
            bad = await http.post(
                "/v1/stripe/meter-errors",
                content=body,
                headers={"Stripe-Signature": sign_payload(body, "whsec_other")},
            )
            # Signed with the rotated secret and the old one: either signature verifies.
            for _ in range(2):  # a redelivery is recorded once
                ok = await http.post(
                    "/v1/stripe/meter-errors",
                    content=body,
                    headers={"Stripe-Signature": sign_payload(body, ["whsec_old", secret])},
                )
                assert (ok.status_code, ok.json()) == (200, {"ok": True, "org_id": org.id})
            shown = await http.get(f"/v1/orgs/{org.id}", headers={"Authorization": f"Bearer {API_TOKEN}"})
        assert shown.status_code == 200, shown.text
        assert [(e["event_id"], e["code"]) for e in shown.json()["stripe_meter_errors"]] == [
            (ok.json() and json.loads(body)["id"], "meter_event_customer_not_found")
        ]
        assert [(r["status"], r["quantity"]) for r in shown.json()["stripe_reports"]] == [("sent", 3)]
        assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
        assert (
            REGISTRY.get_sample_value(
                "billing_stripe_meter_errors_total", {"type": "v1.billing.meter.error_report_triggered"}
            )
            == counted + 1
        )
        status = await load_org_status(pool, org.id, f"{hour:%Y-%m}", stripe_configured=True)
        assert status is not None
        assert [
            (e["code"], e["message"], e["error_count"], e["unmatched"], identifier in e["identifiers"])
            for e in status.stripe_meter_errors
        ] == [("meter_event_customer_not_found", "No customer found for the event.", 1, False, True)]


async def test_storage_catches_up_every_missed_hour_at_its_own_level(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    """The storage job did not run for three hours: the next run queues them, each at the level the
    org held in that hour (from the ledger), plus its own hour."""
    hour = this_hour()  # read once: two reads may straddle hh:00
    now = datetime.now(UTC)
    top = hour - timedelta(hours=1)  # the hour the run was scheduled for
    with FakeStripe() as fake:
        org = await make_org(pool, plan="pro", stripe_customer_id=fake.add_customer())
        project = org.project_ids[0]
        async with pool.connection() as conn:
            included = (
                await (
                    await conn.execute(
                        "SELECT included FROM plan_limits WHERE plan = 'pro' AND tag = 'storage.usage'"
                    )
                ).fetchone()
            )["included"]
            # The last queued storage hour: top - 4 h.
            await conn.execute(
                "INSERT INTO stripe_report_outbox (organization_id, tag, month, report_hour, event_timestamp,"
                " quantity, source, identifier, status) VALUES (%s, 'storage.usage',"
                " date_trunc('month', %s AT TIME ZONE 'UTC')::date, %s, %s, 1, 'storage:old', %s, 'sent')",
                [
                    org.id,
                    top - timedelta(hours=4),
                    top - timedelta(hours=4),
                    top - timedelta(hours=4),
                    f"old-{org.id}",
                ],
            )
            # Ledger: 2 GiB over from before the outage, 5 GiB over during hour top-2, 1 GiB over at top.
            for applied, over in (
                (top - timedelta(hours=5), 2),
                (top - timedelta(hours=2) + timedelta(minutes=30), 5),
                (top + timedelta(minutes=10), 1),
            ):
                month = datetime(applied.year, applied.month, 1).date()
                await conn.execute(
                    "INSERT INTO usage_ledger (batch_id, organization_id, project_id, tag, month, counter_rows,"
                    " delta, value_after, applied_at) VALUES ('b', %s, %s, 'storage.usage', %s, 1, 0, %s, %s)",
                    [org.id, project, month, included + over * GIB, min(applied, now)],
                )
        settings = stripe_settings(database_url, client, fake)
        activities = StripeReportActivities(pool, client, settings.task_queue, make_stripe_client(settings))
        queued = await ActivityEnvironment().run(
            activities.queue_storage_overage, QueueStorageOverageInput(hour=f"{top:%Y-%m-%dT%H}")
        )
        again = await ActivityEnvironment().run(
            activities.queue_storage_overage, QueueStorageOverageInput(hour=f"{top:%Y-%m-%dT%H}")
        )
    assert (queued.queued, again.queued) == (4, 0)
    rows = await _rows(pool, org.id, "report_hour", "quantity")
    assert rows[1:] == [
        (top - timedelta(hours=3), 2),
        (top - timedelta(hours=2), 5),
        (top - timedelta(hours=1), 5),
        (top, 1),
    ]


async def test_late_usage_and_a_row_older_than_35_days_are_stamped_at_send_time_and_marked_late(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: two reads may straddle hh:00
    with FakeStripe() as fake:
        org, _customer = await pro_org_with_customer(pool, fake)
        in_period = await queue_rows(pool, org.id, [2], hour=hour)
        # Two months back: its month ended far more than the grace ago (the invoice is final).
        old_month = (hour.replace(day=1) - timedelta(days=32)).replace(day=1)
        old_end = (old_month + timedelta(days=32)).replace(day=1) - timedelta(seconds=1)
        # Older than Stripe's 35 days, and in the month before the late row's month.
        storage_hour = old_month - timedelta(days=40)
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO stripe_report_outbox (organization_id, tag, month, report_hour, event_timestamp,"
                " quantity, source, identifier) VALUES (%s, 'task.created', %s, %s, %s, 7, 'sync:late', %s),"
                " (%s, 'storage.usage', date_trunc('month', %s AT TIME ZONE 'UTC')::date, %s, %s, 3,"
                " 'storage:old', %s)",
                [
                    org.id,
                    old_month.date(),
                    old_end,
                    old_end,
                    f"late-{org.id}",
                    org.id,
                    storage_hour,
                    storage_hour,
                    storage_hour,
                    f"storage-old-{org.id}",
                ],
            )
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            started = datetime.now(UTC)
            result = await report(client, settings, org.id, hour=hour)
            finished = datetime.now(UTC)
    assert result.sent == 3
    events = {e["identifier"]: e for e in fake.meter_events}
    assert events[in_period[0]]["timestamp"] == int(hour.timestamp())
    for late in (f"late-{org.id}", f"storage-old-{org.id}"):
        assert int(started.timestamp()) - 1 <= events[late]["timestamp"] <= int(finished.timestamp()) + 1
    rows = await _rows(
        pool, org.id, "identifier", "status", "sent_late", "status_reason", "to_char(month, 'YYYY-MM')"
    )
    assert rows == [
        (in_period[0], "sent", False, None, f"{hour:%Y-%m}"),
        (f"late-{org.id}", "sent", True, "sent late: stamped at send time", f"{old_month:%Y-%m}"),
        (f"storage-old-{org.id}", "sent", True, "sent late: stamped at send time", f"{storage_hour:%Y-%m}"),
    ]
    status = await load_org_status(pool, org.id, f"{old_month:%Y-%m}", stripe_configured=True)
    assert status is not None
    assert [(r.status, r.reports, r.quantity) for r in status.stripe_reports] == [("sent_late", 1, 7)]


async def test_operator_commands_on_the_cli_record_who_and_why_and_refuse_bad_input(
    pool: AsyncConnectionPool, database_url: str
) -> None:
    import os
    import subprocess

    from tests.conftest import VENV_BIN

    hour = this_hour()  # read once: two reads may straddle hh:00

    org = await make_org(pool, plan="pro")
    first, second = await queue_rows(pool, org.id, [3, 4], hour=hour)
    env = {**os.environ, "DATABASE_URL": database_url}
    env.pop("STRIPE_API_KEY", None)

    def billing(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "billing"), *args], env=env, capture_output=True, text=True, timeout=60
        )

    voided = await asyncio.to_thread(
        billing, "report-void", org.id, first, "--reason", "customer refunded", "--by", "alice"
    )
    assert (voided.returncode, voided.stdout, voided.stderr) == (0, f"{first} voided\n", "")
    again = await asyncio.to_thread(billing, "report-void", org.id, first, second, "--reason", "twice")
    assert again.returncode == 2
    assert again.stderr == (
        f"billing: error: report row {first} is voided; void applies to failed, pending, uncertain rows only\n"
    )
    missing = await asyncio.to_thread(billing, "report-resend", org.id, second, "--reason", " ")
    assert missing.returncode == 2 and "--reason must not be empty" in missing.stderr
    listed = await asyncio.to_thread(billing, "report-list", org.id)
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0] == f"{second}  task.created  {hour:%Y-%m}  4  pending"
    assert lines[1].endswith(f"alice void {first} (pending): customer refunded")
    assert await _rows(
        pool, org.id, "status", "status_reason LIKE 'voided by alice at %%: customer refunded'"
    ) == [
        ("voided", True),
        ("pending", None),
    ]


def test_the_horizon_and_the_finalization_grace_are_durations_and_bad_values_name_their_variable() -> None:
    from billing.core.config import Settings
    from billing.core.errors import ConfigError

    loaded = Settings.load(BILLING_REPORT_HORIZON="12h", BILLING_STRIPE_FINALIZATION_GRACE="90m")
    assert (loaded.report_horizon, loaded.finalization_grace) == (timedelta(hours=12), timedelta(minutes=90))
    defaults = Settings.load()
    assert (defaults.report_horizon, defaults.finalization_grace) == (timedelta(hours=20), timedelta(hours=1))
    for name, value, message in (
        ("BILLING_REPORT_HORIZON", "soon", "expected a duration such as 30s, 90m, 20h or 35d, got 'soon'"),
        (
            "BILLING_REPORT_HORIZON",
            "25h",
            "must be at most 24h (Stripe deduplicates identifiers for 24 hours)",
        ),
        ("BILLING_STRIPE_FINALIZATION_GRACE", "0h", "must be more than zero"),
    ):
        with pytest.raises(ConfigError) as raised:
            Settings.load(**{name: value})
        assert str(raised.value) == f"{name}: {message}"


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for a condition the product guarantees (the bound only turns a hang into a failure)."""
    for _ in range(1200):
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


def _meter_calls(fake: FakeStripe) -> list[tuple[str, int | None, str | None]]:
    """(identifier, status, Idempotency-Key) of every answered meter-event request, in arrival order."""
    return [
        (r.params.get("identifier", ""), r.status, r.idempotency_key)
        for r in fake.requests
        if r.path == METER_EVENTS and r.status is not None
    ]


async def _refused_and_waiting(
    pool: AsyncConnectionPool, fake: FakeStripe, org_id: str, status: int, reason: str
) -> None:
    """Wait until Stripe refused the first row with ``status`` three times (Temporal retried it) and
    its row says so; then no row is sent, failed or voided and nothing was counted."""

    async def refused_thrice() -> bool:
        return sum(1 for _, answered, _ in _meter_calls(fake) if answered == status) >= 3

    async def recorded() -> bool:
        return (await outbox(pool, org_id))[0]["status_reason"] == reason

    await _until(refused_thrice, f"three {status} answers")
    await _until(recorded, f"the first row's reason {reason!r}")
    rows = await outbox(pool, org_id)
    assert {r["status"] for r in rows} <= {"pending", "sending"}
    assert [r["status_reason"] for r in rows[1:]] == [None] * (len(rows) - 1)  # never called
    assert fake.meter_events == []


async def test_a_rotated_key_401_keeps_rows_pending_and_retrying_and_the_new_key_sends_each_row_once(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    """README: 401 (bad, revoked key) -> rows stay pending, retried; fix STRIPE_API_KEY, restart the
    workers: the running report sends every row, each counted once."""
    hour = this_hour()
    new_key = "sk_test_rotated_key"
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [2, 3], hour=hour)
        fake.set_api_key(new_key)  # the key the workers hold was rolled in Stripe
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            starts = await start_stripe_reports(client, settings.task_queue, [org.id], hour, tuning=FAST)
            await _refused_and_waiting(
                pool,
                fake,
                org.id,
                401,
                f"will retry: 401 Invalid API Key provided: {TEST_KEY[:8]}****{TEST_KEY[-4:]}",
            )
        refused = _meter_calls(fake)
        # Every refusal was the first row's, under its first key: a 401 is not stored, the key is kept.
        assert {(i, s, k) for i, s, k in refused} == {(identifiers[0], 401, idempotency_key(identifiers[0]))}
        # The workers restart with the new key, on the same task queue: the same report finishes.
        fixed = make_settings(
            database_url,
            client,
            STRIPE_API_KEY=new_key,
            STRIPE_API_BASE=fake.url,
            BILLING_TASK_QUEUE=settings.task_queue,
        )
        async with running_worker(fixed, pool, client):
            result = await client.get_workflow_handle(
                starts.workflow_ids[0], result_type=StripeReportResult
            ).result()
        assert (result.sent, result.deduplicated, result.failed, result.pending) == (2, 0, 0, 0)
        assert counted_identifiers(fake) == identifiers
        assert fake.total(customer, "agent_tasks") == 5
        accepted = [(i, s) for i, s, _ in _meter_calls(fake)[len(refused) :] if s != 401]
        assert accepted == [(identifiers[0], 200), (identifiers[1], 200)]
        assert [r["status"] for r in await outbox(pool, org.id)] == ["sent", "sent"]


async def test_a_restricted_key_403_keeps_rows_pending_and_retrying_until_granted_then_sends_each_row_once(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    """README: 403 (restricted key without the permission) -> like a 429: rows stay pending and are
    retried with the same key; once the key may write meter events, each row is counted once."""
    hour = this_hour()
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [4, 6], hour=hour)
        fake.forbid_key(TEST_KEY, path_prefix=METER_EVENTS)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            starts = await start_stripe_reports(client, settings.task_queue, [org.id], hour, tuning=FAST)
            await _refused_and_waiting(
                pool,
                fake,
                org.id,
                403,
                f"will retry: 403 The provided key '{TEST_KEY[:8]}****{TEST_KEY[-4:]}' does not have the "
                "required permissions for this endpoint.",
            )
            fake.allow_key(TEST_KEY)  # the permission is granted in the dashboard; no restart
            result = await client.get_workflow_handle(
                starts.workflow_ids[0], result_type=StripeReportResult
            ).result()
        assert (result.sent, result.deduplicated, result.failed, result.pending) == (2, 0, 0, 0)
        assert counted_identifiers(fake) == identifiers
        assert fake.total(customer, "agent_tasks") == 10
        calls = _meter_calls(fake)
        refused = [c for c in calls if c[1] == 403]
        assert len(refused) >= 3
        assert {c for c in refused} == {(identifiers[0], 403, idempotency_key(identifiers[0]))}
        # Every 403 came before the first success, and each row succeeded once, under its first key.
        assert calls[len(refused) :] == [
            (identifiers[0], 200, idempotency_key(identifiers[0])),
            (identifiers[1], 200, idempotency_key(identifiers[1])),
        ]
        assert await _rows(pool, org.id, "status", "key_generation", "attempts") == [
            ("sent", 0, len(refused) + 1),
            ("sent", 0, 1),
        ]


async def test_a_409_key_in_use_is_retried_under_the_same_key_and_the_row_counted_once(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    """README: 409 (key in use) -> refused in front of the API, pending with "will retry", same key,
    Temporal backs off; the retry is counted once."""
    hour = this_hour()
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [7, 9], hour=hour)
        fake.fail_next(2, status=409, path_prefix=METER_EVENTS)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            result = await report(client, settings, org.id, hour=hour)
    assert (result.sent, result.deduplicated, result.failed, result.pending) == (2, 0, 0, 0)
    assert counted_identifiers(fake) == identifiers
    assert fake.total(customer, "agent_tasks") == 16
    first_key = idempotency_key(identifiers[0])
    assert _meter_calls(fake) == [
        (identifiers[0], 409, first_key),
        (identifiers[0], 409, first_key),
        (identifiers[0], 200, first_key),
        (identifiers[1], 200, idempotency_key(identifiers[1])),
    ]
    assert await _rows(pool, org.id, "status", "key_generation", "attempts", "status_reason") == [
        ("sent", 0, 3, None),
        ("sent", 0, 1, None),
    ]


async def test_a_new_pool_session_is_configured_without_a_transaction(database_url: str) -> None:
    # The race behind a rare failure of the test above: the pool grew a session while a call was held,
    # and its configuration (BEGIN; SET; COMMIT) was caught "idle in transaction". Now it is one
    # autocommit statement: the session's last statement is the SET, never a COMMIT.
    async with await psycopg.AsyncConnection.connect(database_url) as fresh:
        await configure_session(fresh)
        assert not fresh.autocommit and fresh.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as observer:
            cursor = await observer.execute(
                "SELECT query FROM pg_stat_activity WHERE pid = %s", [fresh.info.backend_pid]
            )
            assert (await cursor.fetchone())[0] == "SET temp_buffers = '64MB'"
