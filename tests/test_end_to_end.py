"""The whole path of a paid org's overage: counter rows pushed to the API, applied by
``usage-sync/{batch}``, queued in the outbox, sent by ``stripe-report/{org}/{hour}`` to (fake) Stripe,
and reconciled. Every unit above the included quantity reaches Stripe exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from api.app import create_app
from billing.adapters.stripe_client import make_stripe_client
from billing.read.reconcile import reconcile
from billing.testing.stripe_server import FakeStripe
from tests.conftest import API_TOKEN, Clock, running_worker
from tests.factories import fetch_value, make_org
from tests.report_support import stripe_settings
from tests.usage_support import day_start, month_start, row, utc_now

INCLUDED_PRO_TASKS = 50_000


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


async def _sent(pool: AsyncConnectionPool, org_id: str) -> list[tuple[str, int]]:
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT status, quantity FROM stripe_report_outbox WHERE organization_id = %s ORDER BY id",
                [org_id],
            )
        ).fetchall()
    return [(r["status"], r["quantity"]) for r in rows]


async def test_pushed_overage_reaches_stripe_exactly_once_and_reconciles(
    database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe, clock: Clock
) -> None:
    await clock.freeze()  # "today" and the product's month stay one month for the whole test
    customer = fake.add_customer()
    org = await make_org(pool, plan="pro", projects=2, stripe_customer_id=customer)
    a, b = org.project_ids
    settings = stripe_settings(database_url, client, fake)
    today = day_start(utc_now())
    pushes = [
        [row(a, "task.created", today, 49_990)],  # under the included 50,000: nothing to bill
        [row(a, "task.created", today, 49_990), row(b, "task.created", today, 110)],  # 100 over
        [row(a, "task.created", today, 50_140), row(b, "task.created", today, 110)],  # 150 more
    ]
    async with (
        running_worker(settings, pool, client),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(settings, pool, client)),
            base_url="http://billing.test",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=60,
        ) as http,
    ):
        for rows in [*pushes, pushes[-1]]:  # the last push twice: the same batch, counted once
            response = await http.post("/v1/metrics", json={"metrics": rows})
            assert response.status_code == 200, response.text
        deadline = time.monotonic() + 120  # a guard against hanging, not a timing expectation
        while {status for status, _ in await _sent(pool, org.id)} != {"sent"}:
            assert time.monotonic() < deadline, await _sent(pool, org.id)
            await asyncio.sleep(0.1)

    assert await _sent(pool, org.id) == [("sent", 100), ("sent", 150)]
    assert fake.total(customer, "agent_tasks") == 250
    assert len(fake.meter_events) == 2
    stripe_client = make_stripe_client(settings)
    assert stripe_client is not None
    report = await reconcile(pool, stripe_client, org.id, f"{month_start(today):%Y-%m}")
    assert report.matches, report
    assert {m.event_name: m.ledger for m in report.meters}["agent_tasks"] == 250
    # Stripe got exactly the org's month usage above the plan's included quantity, as stored.
    included = await fetch_value(
        pool, "SELECT included FROM plan_limits WHERE plan = 'pro' AND tag = 'task.created'"
    )
    used = await fetch_value(
        pool,
        "SELECT value FROM org_usage WHERE organization_id = %s AND tag = 'task.created' AND month = %s",
        [org.id, month_start(today)],
    )
    assert (included, used) == (INCLUDED_PRO_TASKS, 50_140 + 110)
    assert fake.total(customer, "agent_tasks") == used - included
