"""Shared helpers of the Stripe reporting tests: outbox rows written the way the usage sync writes them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.core.clock import utcnow
from billing.core.config import Settings
from billing.models.stripe_report import ReportTuning, StripeReportResult
from billing.orchestration.temporal import start_stripe_reports
from billing.testing.stripe_server import FakeStripe
from tests.conftest import make_settings
from tests.factories import Org, make_org

# Short retry intervals so a 429 storm or a killed worker is recovered from in seconds, not minutes (a
# killed worker's claim is taken over once its 3 s lease expires). The heartbeat timeout is not short
# enough that a live worker on a loaded machine (heartbeating every third of it) could miss it and have
# its activity retried concurrently, which would make the tests' exact request counts a race.
FAST = ReportTuning(
    initial_interval_seconds=0.05,
    maximum_interval_seconds=0.4,
    heartbeat_timeout_seconds=10.0,
    page_size=100,
    lease_seconds=3.0,
)
TEST_KEY = "sk_test_reporting"


def this_hour() -> datetime:
    """The current UTC hour (of ``billing.core.clock``): inside this month, and within Stripe's 35-day
    window. Read it once per test: two reads may straddle hh:00."""
    return utcnow().replace(minute=0, second=0, microsecond=0)


async def pro_org_with_customer(pool: AsyncConnectionPool, fake: FakeStripe) -> tuple[Org, str]:
    """A ``pro`` org whose Stripe customer exists at ``fake``; returns the org and the customer id."""
    customer = fake.add_customer()
    return await make_org(pool, plan="pro", stripe_customer_id=customer), customer


def stripe_settings(database_url: str, client: Client, fake: FakeStripe, **overrides: str) -> Settings:
    """Test settings with STRIPE_API_KEY set and STRIPE_API_BASE pointing at ``fake``."""
    return make_settings(database_url, client, STRIPE_API_KEY=TEST_KEY, STRIPE_API_BASE=fake.url, **overrides)


async def queue_rows(
    pool: AsyncConnectionPool,
    org_id: str,
    quantities: list[int],
    *,
    tag: str = "task.created",
    hour: datetime | None = None,
    batch: str | None = None,
) -> list[str]:
    """Insert one pending outbox row per quantity, oldest first, as sync batch ``batch`` (default a fresh
    one) would, stamped ``hour`` (default this hour); returns the identifiers in row order."""
    hour = hour or this_hour()
    batch = batch or uuid.uuid4().hex[:12]
    identifiers = [f"sync-test-{batch}-{i}" for i in range(len(quantities))]
    async with pool.connection() as conn:
        for identifier, quantity in zip(identifiers, quantities, strict=True):
            await conn.execute(
                "INSERT INTO stripe_report_outbox (organization_id, tag, month, report_hour,"
                " event_timestamp, quantity, source, identifier)"
                " VALUES (%s, %s, date_trunc('month', %s AT TIME ZONE 'UTC')::date, %s, %s, %s, %s, %s)",
                [org_id, tag, hour, hour, hour, quantity, f"sync:{batch}", identifier],
            )
    return identifiers


async def outbox(pool: AsyncConnectionPool, org_id: str) -> list[dict[str, Any]]:
    """The org's outbox rows in id order: what was queued (by whom, for when) and how sending went."""
    async with pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT id, identifier, tag, month, quantity, event_timestamp, report_hour, source,"
            " status, status_reason, stripe_response, attempts, sent_at"
            " FROM stripe_report_outbox WHERE organization_id = %s ORDER BY id",
            [org_id],
        )
        return list(await cursor.fetchall())


async def report(
    client: Client,
    settings: Settings,
    org_id: str,
    *,
    hour: datetime | None = None,
    tuning: ReportTuning = FAST,
) -> StripeReportResult:
    """Start the org's stripe-report workflow and wait for its result."""
    starts = await start_stripe_reports(
        client, settings.task_queue, [org_id], hour or this_hour(), tuning=tuning
    )
    handle = client.get_workflow_handle(starts.workflow_ids[0], result_type=StripeReportResult)
    return await handle.result()


def counted_identifiers(fake: FakeStripe) -> list[str]:
    """Identifiers of the events Stripe counted, in the order it counted them."""
    return [event["identifier"] for event in fake.meter_events]


def meter_event_requests(fake: FakeStripe) -> list[str]:
    """The identifier of every meter-event request the fake received, in arrival order."""
    return [r.params.get("identifier", "") for r in fake.requests if r.path == "/v1/billing/meter_events"]
