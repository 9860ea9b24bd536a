"""``stripe-report/{org}/{hour}`` against real PostgreSQL, the Temporal dev server and FakeStripe."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from activities.stripe_reports import idempotency_key
from billing.adapters.stripe_client import make_stripe_client
from billing.domain.ids import stripe_report_id
from billing.models.stripe_report import StripeReportResult
from billing.orchestration.temporal import start_stripe_reports
from billing.read.reconcile import reconcile
from billing.read.status import load_org_status
from billing.testing.stripe_server import FakeStripe
from tests.conftest import make_settings, running_worker
from tests.factories import make_org
from tests.report_support import (
    FAST,
    counted_identifiers,
    meter_event_requests,
    outbox,
    pro_org_with_customer,
    queue_rows,
    report,
    stripe_settings,
    this_hour,
)
from workflows.stripe_report import StorageOverageWorkflow


async def _waiting_metrics(settings, pool: AsyncConnectionPool, client: Client) -> tuple[float, float]:
    """billing_stripe_outbox_rows and _units of state waiting_for_customer, as GET /metrics shows them."""
    from api.app import create_app

    transport = httpx.ASGITransport(app=create_app(settings, pool, client))
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
        text = (await http.get("/metrics")).text
    values = {}
    for line in text.splitlines():
        for name in ("billing_stripe_outbox_rows", "billing_stripe_outbox_units"):
            if line.startswith(f'{name}{{state="waiting_for_customer"}} '):
                values[name] = float(line.split()[-1])
    return values["billing_stripe_outbox_rows"], values["billing_stripe_outbox_units"]


async def _assert_reconciles(pool: AsyncConnectionPool, settings, org_id: str, hour: datetime) -> None:
    stripe_client = make_stripe_client(settings)
    assert stripe_client is not None
    result = await reconcile(pool, stripe_client, org_id, f"{hour:%Y-%m}")
    assert result.matches, result.meters
    assert all(meter.difference == 0 for meter in result.meters)


async def test_each_pending_row_becomes_one_meter_event_oldest_first(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [5, 7, 11], hour=hour)
        identifiers += await queue_rows(pool, org.id, [3], tag="space.learned", hour=hour)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            result = await report(client, settings, org.id, hour=hour)

        assert (result.sent, result.deduplicated, result.failed, result.skipped, result.pending) == (
            4,
            0,
            0,
            0,
            0,
        )
        assert result.outcome == "4 sent (0 already in Stripe), 0 failed, 0 pending"
        events = fake.meter_events
        assert [e["identifier"] for e in events] == identifiers
        assert [(e["event_name"], e["value"]) for e in events] == [
            ("agent_tasks", 5),
            ("agent_tasks", 7),
            ("agent_tasks", 11),
            ("skill_blocks", 3),
        ]
        assert {e["customer"] for e in events} == {customer}
        assert {e["timestamp"] for e in events} == {int(hour.timestamp())}
        keys = [r.idempotency_key for r in fake.requests if r.path == "/v1/billing/meter_events"]
        assert keys == [idempotency_key(i) for i in identifiers]
        rows = await outbox(pool, org.id)
        assert [(r["status"], r["attempts"]) for r in rows] == [("sent", 1)] * 4
        assert all(r["sent_at"] is not None for r in rows)
        assert [r["stripe_response"]["identifier"] for r in rows] == identifiers
        await _assert_reconciles(pool, settings, org.id, hour)


async def test_counted_then_dropped_on_every_first_call_counts_each_row_once(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    with FakeStripe() as fake:
        customer = fake.add_customer()
        org = await make_org(pool, plan="team", stripe_customer_id=customer)
        identifiers = await queue_rows(pool, org.id, [1, 2, 3, 4], hour=hour)
        fake.drop_after_commit_first_attempts()
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            result = await report(client, settings, org.id, hour=hour)

        # Every row: a first call counted and then lost; the retry, under the row's next key (no answer
        # may be a stored error), is answered by Stripe's identifier dedupe: counted once.
        assert meter_event_requests(fake) == [i for i in identifiers for _ in range(2)]
        keys = [r.idempotency_key for r in fake.requests if r.path == "/v1/billing/meter_events"]
        assert keys == [idempotency_key(i, generation) for i in identifiers for generation in (0, 1)]
        assert counted_identifiers(fake) == identifiers
        assert fake.total(customer, "agent_tasks") == 10
        assert (result.sent, result.deduplicated) == (4, 4)
        assert [(r["status"], r["attempts"]) for r in await outbox(pool, org.id)] == [("sent", 2)] * 4
        await _assert_reconciles(pool, settings, org.id, hour)


async def test_a_429_and_5xx_storm_sends_everything_eventually_oldest_first(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, list(range(1, 9)), hour=hour)
        fake.fail_next(3, status=429)
        fake.fail_next(1, status=503)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            result = await report(client, settings, org.id, hour=hour)
            # A second storm in the middle of the backlog: progress before it is kept.
            more = await queue_rows(pool, org.id, [100, 200, 300], hour=hour)
            fake.fail_next(1, status=500)
            fake.fail_next(1, status=429, path_prefix="/v1/billing/meter_events")
            again = await report(client, settings, org.id, hour=hour - timedelta(hours=1))

        assert counted_identifiers(fake) == identifiers + more
        assert fake.total(customer, "agent_tasks") == 36 + 600
        assert (result.sent, again.sent) == (8, 3)
        rows = await outbox(pool, org.id)
        # The first row of each storm was attempted once per failure and once more.
        assert [r["attempts"] for r in rows] == [5, 1, 1, 1, 1, 1, 1, 1, 3, 1, 1]
        assert {r["status"] for r in rows} == {"sent"}
        assert all(r["status_reason"] is None for r in rows)
        await _assert_reconciles(pool, settings, org.id, hour)


async def test_two_overlapping_reports_of_one_org_send_each_row_once_in_order(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    with FakeStripe() as fake:
        org, _customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [1] * 12, hour=hour)
        fake.slow_next(4, 0.2, path_prefix="/v1/billing/meter_events")
        settings = stripe_settings(database_url, client, fake)
        small_pages = FAST.model_copy(update={"page_size": 3})
        async with running_worker(settings, pool, client):
            # Two syncs of different hours, and a repeat of one, all at once.
            starts = await asyncio.gather(
                start_stripe_reports(client, settings.task_queue, [org.id], hour, tuning=small_pages),
                start_stripe_reports(
                    client, settings.task_queue, [org.id], hour - timedelta(hours=1), tuning=small_pages
                ),
                start_stripe_reports(client, settings.task_queue, [org.id], hour, tuning=small_pages),
            )
            handles = [
                client.get_workflow_handle(wid, result_type=StripeReportResult)
                for wid in sorted({s.workflow_ids[0] for s in starts})
            ]
            results = [await handle.result() for handle in handles]
            runs = [await handle.describe() for handle in handles]

        # They did overlap: each started before the other closed (Temporal's own timestamps).
        assert all(run.start_time and run.close_time for run in runs)
        assert max(run.start_time for run in runs) < min(run.close_time for run in runs)  # type: ignore[type-var]

        assert len(results) == 2
        assert {s.workflow_ids[0] for s in starts} == {
            stripe_report_id(org.id, hour),
            stripe_report_id(org.id, hour - timedelta(hours=1)),
        }
        # Never two requests for one row: the reports took turns, page by page.
        assert meter_event_requests(fake) == identifiers
        assert counted_identifiers(fake) == identifiers
        assert sum(r.sent for r in results) == 12
        assert sum(r.deduplicated for r in results) == 0
        await _assert_reconciles(pool, settings, org.id, hour)


async def test_a_refused_row_fails_with_stripes_message_and_the_others_are_sent(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    # A value Stripe cannot read is the row's own fault: that row fails with Stripe's message.
    with FakeStripe() as fake:
        org, _customer = await pro_org_with_customer(pool, fake)
        first = await queue_rows(pool, org.id, [4], hour=hour)
        refused = await queue_rows(pool, org.id, [9], tag="space.learned", hour=hour)
        last = await queue_rows(pool, org.id, [6], hour=hour)
        gone = fake.add_customer()
        deleted = await make_org(pool, plan="pro", stripe_customer_id=gone)
        await queue_rows(pool, deleted.id, [2, 3], hour=hour)
        fake.delete_customer(gone)
        fake.fail_next(1, status=400, path_prefix="/v1/billing/meter_events", store=True)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            result = await report(client, settings, org.id, hour=hour)
            deleted_result = await report(client, settings, deleted.id, hour=hour)

        assert counted_identifiers(fake) == refused + last
        message = "Injected failure (HTTP 400)."
        assert (result.sent, result.failed, result.pending) == (2, 1, 0)
        assert result.outcome == (
            f"2 sent (0 already in Stripe), 1 failed, 0 pending; last refusal: {first[0]}: {message}"
        )
        rows = await outbox(pool, org.id)
        assert [r["status"] for r in rows] == ["failed", "sent", "sent"]
        assert rows[0]["status_reason"] == message
        assert rows[0]["stripe_response"]["error"]["message"] == message
        assert (deleted_result.sent, deleted_result.failed) == (0, 2)
        assert {r["status_reason"] for r in await outbox(pool, deleted.id)} == {f"No such customer: '{gone}'"}
        status = await load_org_status(pool, org.id, f"{hour:%Y-%m}", stripe_configured=True)
        assert status is not None
        assert [(r.status, r.reports, r.quantity, r.last_reason) for r in status.stripe_reports] == [
            ("failed", 1, 4, message),
            ("sent", 2, 15, None),
        ]


async def test_a_queued_row_of_a_free_org_is_sent_and_one_without_customer_waits_for_it(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    """Billability is decided at queue time: a queued row is owed whatever the plan is now (issue 9:
    the churned customer whose backlog was skipped), and no customer means waiting, not skipping."""
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    with FakeStripe() as fake:
        churned_customer = fake.add_customer()
        churned = await make_org(pool, plan="free", stripe_customer_id=churned_customer)
        nameless = await make_org(pool, plan="team")
        churned_rows = await queue_rows(pool, churned.id, [10, 20], hour=hour)
        nameless_rows = await queue_rows(pool, nameless.id, [30], hour=hour)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            churned_result = await report(client, settings, churned.id, hour=hour)
            nameless_result = await report(client, settings, nameless.id, hour=hour)

            assert counted_identifiers(fake) == churned_rows
            assert fake.total(churned_customer, "agent_tasks") == 30
            assert (churned_result.sent, churned_result.skipped) == (2, 0)
            assert (nameless_result.sent, nameless_result.pending, nameless_result.skipped) == (0, 1, 0)
            assert nameless_result.outcome == (
                "0 sent (0 already in Stripe), 0 failed, 1 pending; pending rows are waiting for a Stripe customer"
            )
            assert [(r["status"], r["status_reason"]) for r in await outbox(pool, nameless.id)] == [
                ("pending", "waiting for a Stripe customer")
            ]
            status = await load_org_status(pool, nameless.id, f"{hour:%Y-%m}", stripe_configured=True)
            assert status is not None
            assert [(r.status, r.reports, r.quantity) for r in status.stripe_reports] == [
                ("waiting_for_customer", 1, 30)
            ]
            # /metrics counts it too (this test's database: this one row, before it is sent).
            waiting_rows, waiting_units = await _waiting_metrics(settings, pool, client)
            assert (waiting_rows, waiting_units) == (1, 30)

            # The customer becomes known (the org-billing workflow records it): the row goes out.
            customer = fake.add_customer()
            async with pool.connection() as conn:
                await conn.execute(
                    "UPDATE organization_billing SET stripe_customer_id = %s WHERE organization_id = %s",
                    [customer, nameless.id],
                )
            later = await report(client, settings, nameless.id, hour=hour - timedelta(hours=1))
            after_rows, after_units = await _waiting_metrics(settings, pool, client)
        assert (after_rows, after_units) == (0, 0)
        assert later.sent == 1
        assert counted_identifiers(fake) == churned_rows + nameless_rows
        assert fake.total(customer, "agent_tasks") == 30


async def test_without_a_key_rows_stay_pending_then_the_hourly_job_sends_them_once_a_key_is_set(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    from billing.models.stripe_report import StorageOverageInput, StorageOverageResult

    with FakeStripe() as fake:
        org, _customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [3, 1, 2], hour=hour)
        keyless = make_settings(database_url, client)
        async with running_worker(keyless, pool, client):
            result = await report(client, keyless, org.id, hour=hour)
            sweep = await client.execute_workflow(
                StorageOverageWorkflow.run,
                StorageOverageInput(hour=f"{hour:%Y-%m-%dT%H}", tuning=FAST),
                id=f"storage-overage-test-{org.id}-keyless",
                task_queue=keyless.task_queue,
                result_type=StorageOverageResult,
            )
        assert result.stripe_configured is False
        assert result.pending == 3
        assert result.outcome == (
            "STRIPE_API_KEY is not set: 3 reports stay pending (none lost); "
            "they are sent in order by the first run after a key is set"
        )
        assert (sweep.stripe_configured, sweep.reports_started) == (False, 0)
        assert [r["status"] for r in await outbox(pool, org.id)] == ["pending"] * 3
        status = await load_org_status(pool, org.id, f"{hour:%Y-%m}", stripe_configured=False)
        assert status is not None
        assert status.stripe_reporting == (
            "STRIPE_API_KEY is not set: 3 reports wait in the outbox as pending, none lost"
        )

        # The operator sets the key and restarts the workers; the next hourly job sends the backlog.
        keyed = stripe_settings(database_url, client, fake)
        async with running_worker(keyed, pool, client):
            sweep = await client.execute_workflow(
                StorageOverageWorkflow.run,
                StorageOverageInput(hour=f"{hour:%Y-%m-%dT%H}", tuning=FAST),
                id=f"storage-overage-test-{org.id}-keyed",
                task_queue=keyed.task_queue,
                result_type=StorageOverageResult,
            )
            handle = client.get_workflow_handle(
                stripe_report_id(org.id, hour), result_type=StripeReportResult
            )
            sent = await handle.result()
        assert sweep.stripe_configured is True
        assert sweep.reports_started == 1
        assert sent.sent == 3
        assert counted_identifiers(fake) == identifiers
        assert [r["status"] for r in await outbox(pool, org.id)] == ["sent"] * 3
        await _assert_reconciles(pool, keyed, org.id, hour)


async def test_the_start_activity_the_sync_calls_starts_or_signals_one_report_per_org(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    """``start_pending_stripe_reports`` with the batch's source (what ``usage-sync/{batch}`` runs): the
    first call starts the org's report, a second one while it runs only signals it."""
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    from temporalio.testing import ActivityEnvironment

    from activities.stripe_reports import StripeReportActivities
    from billing.models.stripe_report import StartPendingReportsInput

    with FakeStripe() as fake:
        org, _customer = await pro_org_with_customer(pool, fake)
        batch = uuid.uuid4().hex[:12]
        identifiers = await queue_rows(pool, org.id, [2, 4], hour=hour, batch=batch)
        settings = stripe_settings(database_url, client, fake)
        activities = StripeReportActivities(pool, client, settings.task_queue, make_stripe_client(settings))
        request = StartPendingReportsInput(hour=f"{hour:%Y-%m-%dT%H}", source=f"sync:{batch}", tuning=FAST)
        # No worker yet: the first start's run is still running when the second call comes.
        started = await ActivityEnvironment().run(activities.start_pending_stripe_reports, request)
        again = await ActivityEnvironment().run(activities.start_pending_stripe_reports, request)
        async with running_worker(settings, pool, client):
            handle = client.get_workflow_handle(
                stripe_report_id(org.id, hour), result_type=StripeReportResult
            )
            result = await handle.result()
        assert (started.started, started.already_running, started.stripe_configured) == (1, 0, True)
        assert (again.started, again.already_running, again.last_org_id) == (0, 1, None)
        assert result.sent == 2
        assert counted_identifiers(fake) == identifiers
