"""``billing reconcile ORG --month YYYY-MM``: the outbox's sent totals against Stripe's meter summaries.

For each meter, the sum of the org's ``sent`` outbox rows whose event timestamp lies in the month is
compared with Stripe's aggregated value of the customer's meter events over the same timestamps
(``GET /v1/billing/meters/{id}/event_summaries``). Zero difference everywhere is what exactly-once means.
Real Stripe aggregates asynchronously, so events sent in the last few minutes may not show yet.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import stripe
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from billing.errors import UserError
from billing.months import parse_month
from billing.sql import query


class MeterDifference(BaseModel):
    """One meter: what the ledger says was sent, what Stripe counted, and the difference."""

    tag: str
    event_name: str
    ledger: Decimal
    ledger_events: int
    stripe: Decimal
    difference: Decimal
    note: str | None = None


class ReconcileReport(BaseModel):
    """The comparison of one org and month; ``matches`` is true when every difference is zero."""

    org_id: str
    month: str
    stripe_customer_id: str
    meters: list[MeterDifference]

    @property
    def matches(self) -> bool:
        """Whether Stripe counted exactly what the ledger sent, for every meter."""
        return all(meter.difference == 0 for meter in self.meters)


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """The UTC start of ``month`` and of the month after (Stripe wants minute-aligned bounds)."""
    first = parse_month(month)
    start = datetime(first.year, first.month, 1, tzinfo=UTC)
    end = datetime(first.year + (first.month == 12), first.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


async def reconcile(
    pool: AsyncConnectionPool, stripe_client: stripe.StripeClient, org_id: str, month: str
) -> ReconcileReport:
    """Compare the org's sent totals per meter with Stripe's; UserError when the org cannot be compared."""
    start, end = month_bounds(month)
    async with pool.connection() as conn:
        billing = await (await conn.execute(query("org_billing"), {"org_id": org_id})).fetchone()
        if billing is None:
            raise UserError(f"organization {org_id} does not exist")
        if not billing["stripe_customer_id"]:
            raise UserError(f"organization {org_id} has no stripe_customer_id: nothing was sent to compare")
        ledger = await (
            await conn.execute(query("reconcile_sent_totals"), {"org_id": org_id, "start": start, "end": end})
        ).fetchall()
    customer = billing["stripe_customer_id"]
    meter_ids = await _meter_ids(stripe_client)
    meters = []
    for row in ledger:
        sent = Decimal(row["sent"])
        meter_id = meter_ids.get(row["stripe_event_name"])
        if meter_id is None:
            note = "Stripe has no active meter with this event name"
            counted = Decimal(0)
        else:
            note = None
            counted = await _stripe_total(stripe_client, meter_id, customer, start, end)
        meters.append(
            MeterDifference(
                tag=row["tag"],
                event_name=row["stripe_event_name"],
                ledger=sent,
                ledger_events=row["events"],
                stripe=counted,
                difference=counted - sent,
                note=note,
            )
        )
    return ReconcileReport(org_id=org_id, month=month, stripe_customer_id=customer, meters=meters)


async def _meter_ids(stripe_client: stripe.StripeClient) -> dict[str, str]:
    """Active meters by event name, across every page."""
    found: dict[str, str] = {}
    params: dict[str, object] = {"status": "active", "limit": 100}
    while True:
        page = await stripe_client.v1.billing.meters.list_async(params)  # type: ignore[arg-type]
        for meter in page.data:
            found[meter.event_name] = meter.id
        if not page.has_more or not page.data:
            return found
        params["starting_after"] = page.data[-1].id


async def _stripe_total(
    stripe_client: stripe.StripeClient, meter_id: str, customer: str, start: datetime, end: datetime
) -> Decimal:
    """The customer's aggregated value of one meter between ``start`` and ``end``."""
    total = Decimal(0)
    params: dict[str, object] = {
        "customer": customer,
        "start_time": int(start.timestamp()),
        "end_time": int(end.timestamp()),
        "limit": 100,
    }
    while True:
        page = await stripe_client.v1.billing.meters.event_summaries.list_async(
            meter_id,
            params,  # type: ignore[arg-type]
        )
        for summary in page.data:
            # str() first: a float such as 0.1 must not turn into 0.1000000000000000055...
            total += Decimal(str(summary.aggregated_value))
        if not page.has_more or not page.data:
            return total
        params["starting_after"] = page.data[-1].id
