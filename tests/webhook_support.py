"""Shared harness of the webhook and org-billing tests: signed deliveries through the real ASGI app, a
worker on the dev server, FakeStripe, and waits on what the org workflow has applied."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from temporalio.client import Client

from api.app import create_app
from billing.core.config import Settings
from billing.models.org_billing import OrgBillingView
from billing.orchestration.temporal import query_org_billing_state
from billing.testing.stripe_server import FakeStripe, sign_payload
from tests.conftest import make_settings, running_worker
from tests.factories import Org, make_org

WEBHOOK_SECRET = "whsec_test_secret_0123456789"
STRIPE_KEY = "sk_test_org_billing"
WAIT_SECONDS = 30.0
T0 = 1_780_000_000  # `created` of the first event of a scenario


@dataclass
class Harness:
    """One test's app, worker and Stripe; `deliver` posts signed events, `settle` waits until applied."""

    settings: Settings
    pool: AsyncConnectionPool
    client: Client
    http: httpx.AsyncClient
    fake: FakeStripe | None
    app: Starlette
    delivered: set[str] = field(default_factory=set)

    async def post(self, payload: dict[str, Any] | bytes, *, signature: str | None = None) -> httpx.Response:
        """POST one delivery, signed with the test secret unless `signature` is given."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        sig = signature if signature is not None else sign_payload(body, WEBHOOK_SECRET)
        if sig:
            headers["Stripe-Signature"] = sig
        return await self.http.post("/v1/stripe/webhook", content=body, headers=headers)

    async def deliver(self, payload: dict[str, Any], times: int = 1) -> None:
        """Deliver an event `times` times, one after the other; each must be answered 200 {"ok": true}."""
        for _ in range(times):
            response = await self.post(payload)
            assert response.status_code == 200, response.text
            assert response.json()["ok"] is True
        self.delivered.add(payload["id"])

    async def settle(self, org_id: str) -> OrgBillingView:
        """Wait until every delivered event is marked applied and the workflow's queue is empty."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT count(*) AS n FROM stripe_webhook_events"
                    " WHERE event_id = ANY(%s) AND status = 'applied'",
                    [sorted(self.delivered)],
                )
                row = await cursor.fetchone()
            view = await query_org_billing_state(self.client, org_id)
            if row and row["n"] == len(self.delivered) and view is not None and view.queued == 0:
                return view
            assert time.monotonic() < deadline, f"events not applied: {row}, {view}"
            await asyncio.sleep(0.05)

    async def billing_row(self, org_id: str) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT plan, pending_plan, payment_status, payment_status_reason, stripe_subscription_id,"
                " extract(epoch FROM period_end)::bigint AS period_end"
                " FROM organization_billing WHERE organization_id = %s",
                [org_id],
            )
            row = await cursor.fetchone()
        assert row is not None
        return dict(row)

    async def flags(self, org_id: str) -> set[tuple[str, str, str]]:
        """(project, tag, reason) of every quota flag of the org."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT project_id::text AS p, tag, reason FROM quota_flags WHERE organization_id = %s",
                [org_id],
            )
            return {(r["p"], r["tag"], r["reason"]) for r in await cursor.fetchall()}

    async def webhook_rows(self, org_id: str | None = None) -> dict[str, tuple[str, str | None]]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT event_id, status, detail FROM stripe_webhook_events"
                " WHERE organization_id IS NOT DISTINCT FROM %s::uuid",
                [org_id],
            )
            return {r["event_id"]: (r["status"], r["detail"]) for r in await cursor.fetchall()}


@contextlib.asynccontextmanager
async def harness(
    database_url: str,
    pool: AsyncConnectionPool,
    client: Client,
    *,
    fake: FakeStripe | None = None,
    worker: bool = True,
    **overrides: str,
) -> AsyncIterator[Harness]:
    """The API app with STRIPE_WEBHOOK_SECRET (and Stripe pointed at `fake`) plus a worker."""
    values = {"STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET}
    if fake is not None:
        values |= {"STRIPE_API_KEY": STRIPE_KEY, "STRIPE_API_BASE": fake.url}
    settings = make_settings(database_url, client, **(values | overrides))
    app = create_app(settings, pool, client)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
        if worker:
            async with running_worker(settings, pool, client):
                yield Harness(settings, pool, client, http, fake, app)
        else:
            yield Harness(settings, pool, client, http, fake, app)


async def paid_org(pool: AsyncConnectionPool, plan: str = "pro", projects: int = 2) -> Org:
    """An org with a Stripe customer `cus_<first 12 hex of its id>`."""
    org = await make_org(pool, plan=plan, projects=projects)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE organization_billing SET stripe_customer_id = %s WHERE organization_id = %s",
            [customer_of(org.id), org.id],
        )
    return org


def customer_of(org_id: str) -> str:
    return "cus_" + org_id.replace("-", "")[:12]


def subscription_of(org_id: str) -> str:
    return "sub_" + org_id.replace("-", "")[:12]


async def add_usage(pool: AsyncConnectionPool, project_id: str, tag: str, amount: int, month: str) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "SELECT increment_project_usage(%s, %s, %s::date, %s)", [project_id, tag, f"{month}-01", amount]
        )
