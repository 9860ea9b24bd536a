"""Property (Hypothesis) over the Stripe outbox: any interleaving of usage, plan changes, customer changes,
operator voids, sends and Stripe faults leaves every queued unit sent exactly once, voided by an
operator, or visibly pending, never anything else (issue 9)."""

from __future__ import annotations

import uuid
from typing import Any

import stripe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.stripe_reports import StripeReportActivities
from billing.adapters.stripe_client import make_stripe_client
from billing.db.report_ops import act_on_rows
from billing.models.stripe_report import SendReportsInput
from billing.testing.stripe_server import FakeStripe
from tests.factories import make_org
from tests.report_support import stripe_settings, this_hour

OPS = st.one_of(
    st.tuples(st.just("usage"), st.integers(min_value=1, max_value=50)),
    st.tuples(st.just("plan"), st.sampled_from(["free", "pro", "team"])),
    st.tuples(st.just("customer"), st.sampled_from([None, "a", "b"])),
    st.tuples(st.just("void"), st.integers(min_value=0, max_value=20)),
    st.tuples(st.just("send"), st.integers(min_value=1, max_value=3)),
    st.tuples(st.just("fault"), st.sampled_from([500, 429, 503])),
)


async def _rows(pool: AsyncConnectionPool, org_id: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT identifier, quantity, status, status_reason FROM stripe_report_outbox"
            " WHERE organization_id = %s ORDER BY id",
            [org_id],
        )
        return list(await cursor.fetchall())


def _check(rows: list[dict[str, Any]], fake: FakeStripe, *, drained: bool) -> None:
    """The invariant: each row sent exactly once, voided and never sent, or visibly pending."""
    counted: dict[str, int] = {}
    for event in fake.meter_events:
        counted[event["identifier"]] = counted.get(event["identifier"], 0) + 1
    for row in rows:
        times = counted.get(row["identifier"], 0)
        if row["status"] == "sent":
            assert times == 1, row
        elif row["status"] == "voided":
            assert times == 0 and row["status_reason"].startswith("voided by ops"), row
        else:
            assert not drained, row
            # Visibly pending: a reason says why, or it simply has not been sent yet; never counted.
            assert row["status"] == "pending" and times == 0, row
    # Stripe counted nothing that is not a sent row.
    assert set(counted) <= {row["identifier"] for row in rows if row["status"] == "sent"}


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=1, max_size=14))
async def test_every_queued_unit_is_sent_once_voided_or_visibly_pending(
    pool: AsyncConnectionPool, client: Client, database_url: str, ops: list[tuple[str, Any]]
) -> None:
    with FakeStripe() as fake:
        customers = {"a": fake.add_customer(), "b": fake.add_customer()}
        org = await make_org(pool, plan="pro")
        cfg = stripe_settings(database_url, client, fake)
        activities = StripeReportActivities(pool, client, cfg.task_queue, make_stripe_client(cfg))
        hour = this_hour()
        plan = "pro"

        async def send(page_size: int) -> None:
            try:
                await ActivityEnvironment().run(
                    activities.send_stripe_reports,
                    SendReportsInput(org_id=org.id, page_size=page_size, lease_seconds=60),
                )
            except (stripe.StripeError, ApplicationError):
                pass  # Temporal would retry; the property must hold in between too

        for op, arg in ops:
            if op == "usage":
                # Billability is decided at queue time, as the usage sync does: only paid plans queue.
                if plan != "free":
                    async with pool.connection() as conn:
                        await conn.execute(
                            "INSERT INTO stripe_report_outbox (organization_id, tag, month, report_hour,"
                            " event_timestamp, quantity, source, identifier) VALUES (%s, 'task.created',"
                            " date_trunc('month', %s AT TIME ZONE 'UTC')::date, %s, %s, %s, 'sync:p', %s)",
                            [org.id, hour, hour, hour, arg, f"p-{uuid.uuid4().hex}"],
                        )
            elif op == "plan":
                plan = arg
                async with pool.connection() as conn:
                    await conn.execute(
                        "UPDATE organization_billing SET plan = %s WHERE organization_id = %s", [arg, org.id]
                    )
            elif op == "customer":
                async with pool.connection() as conn:
                    await conn.execute(
                        "UPDATE organization_billing SET stripe_customer_id = %s WHERE organization_id = %s",
                        [customers.get(arg) if arg else None, org.id],
                    )
            elif op == "void":
                voidable = [r for r in await _rows(pool, org.id) if r["status"] in ("pending", "failed")]
                if voidable:
                    target = voidable[arg % len(voidable)]["identifier"]
                    await act_on_rows(pool, org.id, [target], "void", actor="ops", reason="property test")
            elif op == "send":
                await send(arg)
            elif op == "fault":
                fake.fail_next(1, status=arg, path_prefix="/v1/billing/meter_events")
            _check(await _rows(pool, org.id), fake, drained=False)

        # Then the customer is known and Stripe is healthy: everything queued drains.
        fake.clear_faults()
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE organization_billing SET stripe_customer_id = coalesce(stripe_customer_id, %s)"
                " WHERE organization_id = %s",
                [customers["a"], org.id],
            )
        for _ in range(40):
            rows = await _rows(pool, org.id)
            if all(r["status"] in ("sent", "voided") for r in rows):
                break
            await send(5)
        _check(await _rows(pool, org.id), fake, drained=True)
