"""The Stripe outbox's gauges for /metrics (``billing_stripe_outbox_rows`` / ``_units``).

The report workflows' starter, ``start_stripe_reports``, is in ``billing.orchestration.temporal``.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from billing.db.sql import query
from billing.observability.telemetry import STRIPE_OUTBOX, STRIPE_OUTBOX_UNITS

# The outbox states /metrics shows (billing_stripe_outbox_rows / _units), rows waiting for a customer apart.
OUTBOX_STATES = ("pending", "waiting_for_customer", "sending", "uncertain", "failed")


async def refresh_outbox_gauges(pool: AsyncConnectionPool) -> None:
    """Set ``billing_stripe_outbox_rows`` and ``_units`` per state from PostgreSQL (one small query)."""
    async with pool.connection() as conn:
        totals = await (await conn.execute(query("report_state_totals"))).fetchall()
    for state in OUTBOX_STATES:
        found = next((t for t in totals if t["state"] == state), None)
        STRIPE_OUTBOX.labels(state).set(found["reports"] if found else 0)
        STRIPE_OUTBOX_UNITS.labels(state).set(found["quantity"] if found else 0)
