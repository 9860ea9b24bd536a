"""``billing reconcile ORG --month YYYY-MM``: every queued unit of the month accounted for, and the
outbox's sent totals against Stripe's meter summaries.

1. Queued units: every unit of overage queued for the month, by state. Each must be sent (inside the
   month, or sent late: stamped at send time) or voided by an operator; any other (pending, waiting for
   a customer, sending, uncertain, failed) makes reconcile fail.
2. For each meter, the sum of the org's ``sent`` rows whose sent timestamp lies in the month is compared
   with Stripe's aggregated value over the same timestamps (``event_summaries``). Uncertain rows (past
   the horizon without a settled answer) are listed apart: a difference equal to them says Stripe
   counted them (``billing report-mark-sent``); none says they are missing (``billing report-resend``).
   Stripe's meter error notifications for the org are listed when totals differ.

Real Stripe aggregates asynchronously, so events sent in the last few minutes may not show yet.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import stripe
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from billing.core.errors import UserError
from billing.db.sql import query
from billing.domain.months import parse_month

# A queued unit is accounted for once Stripe has it or an operator wrote it off.
SETTLED_STATES = frozenset({"sent", "sent_late", "voided"})


class MeterDifference(BaseModel):
    """One meter: what the ledger says was sent, what Stripe counted, and the difference."""

    tag: str
    event_name: str
    ledger: Decimal
    ledger_events: int
    stripe: Decimal
    difference: Decimal
    note: str | None = None


class QueuedUnits(BaseModel):
    """Units of the month's queued overage in one state."""

    state: str
    reports: int
    quantity: int


class ReconcileReport(BaseModel):
    """The comparison of one org and month; ``matches`` is true when every difference is zero and every
    queued unit is sent or voided."""

    org_id: str
    month: str
    stripe_customer_id: str
    meters: list[MeterDifference]
    queued: list[QueuedUnits] = []
    uncertain: list[dict[str, Any]] = []
    meter_errors: list[dict[str, Any]] = []

    @property
    def unsettled_units(self) -> int:
        """Queued units of the month neither sent nor voided by an operator."""
        return sum(q.quantity for q in self.queued if q.state not in SETTLED_STATES)

    @property
    def matches(self) -> bool:
        """Whether Stripe counted exactly what the ledger sent, for every meter, and nothing queued is
        left unsettled."""
        return all(meter.difference == 0 for meter in self.meters) and self.unsettled_units == 0


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
        params = {"org_id": org_id, "month": parse_month(month)}
        queued = await (await conn.execute(query("reconcile_queued_units"), params)).fetchall()
        uncertain = await (await conn.execute(query("reconcile_uncertain_rows"), params)).fetchall()
        errors = await (await conn.execute(query("meter_errors_of_org"), params)).fetchall()
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
    differs = any(meter.difference != 0 for meter in meters)
    return ReconcileReport(
        org_id=org_id,
        month=month,
        stripe_customer_id=customer,
        meters=meters,
        queued=[QueuedUnits(**row) for row in queued],
        uncertain=[dict(row) for row in uncertain],
        # Stripe's asynchronous meter errors explain a difference; shown when there is one.
        meter_errors=[dict(row) for row in errors if not row["unmatched"]] if differs else [],
    )


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
