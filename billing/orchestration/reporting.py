"""Starting ``stripe-report/{org_id}/{YYYY-MM-DDTHH}`` workflows: the one starter every caller shares.

A start starts the org's report of that hour, or, while it runs, only signals it that more rows were
queued (``rows_queued``), and the running workflow drains them before it completes. Once it has
completed, the same ID may run again (rows are exactly-once through their identifiers and their outbox
status, not through the workflow ID), so rows queued later in the same hour are not left waiting for the
next hour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from billing.db.sql import query
from billing.domain.hours import hour_key
from billing.domain.ids import stripe_report_id
from billing.domain.months import month_key
from billing.models.search_attributes import MONTH, ORG_ID
from billing.models.stripe_report import ReportTuning, StripeReportInput
from billing.observability.telemetry import STRIPE_OUTBOX, STRIPE_OUTBOX_UNITS
from billing.orchestration.temporal import CONCURRENT_STARTS
from workflows.stripe_report import StripeReportWorkflow

# The outbox states /metrics shows (billing_stripe_outbox_rows / _units), rows waiting for a customer apart.
OUTBOX_STATES = ("pending", "waiting_for_customer", "sending", "uncertain", "failed")


@dataclass(frozen=True)
class ReportStarts:
    """Which workflows a call started, and for how many orgs a report was already running."""

    workflow_ids: list[str]
    started: int
    already_running: int


async def start_stripe_reports(
    client: Client,
    task_queue: str,
    org_ids: Iterable[str],
    hour: datetime,
    *,
    tuning: ReportTuning | None = None,
) -> ReportStarts:
    """Start (or signal, if running) ``stripe-report/{org}/{hour}`` for each org; safe to repeat."""
    key = hour_key(hour)
    gate = asyncio.Semaphore(CONCURRENT_STARTS)

    async def start(org_id: str) -> tuple[str, bool]:
        """Whether a run was started (else the running one was signalled)."""
        workflow_id = stripe_report_id(org_id, hour)
        async with gate:
            while True:
                try:
                    await client.start_workflow(
                        StripeReportWorkflow.run,
                        StripeReportInput(org_id=org_id, hour=key, tuning=tuning or ReportTuning()),
                        id=workflow_id,
                        task_queue=task_queue,
                        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                        search_attributes=TypedSearchAttributes(
                            [SearchAttributePair(ORG_ID, org_id), SearchAttributePair(MONTH, month_key(hour))]
                        ),
                        static_summary=f"Send org {org_id}'s pending overage to Stripe ({key})",
                    )
                    return workflow_id, True
                except WorkflowAlreadyStartedError:
                    pass
                # Running: tell it more rows are queued. (Not one signal-with-start: the SDK keeps
                # whether that started a run only on a private attribute, and the counts need it.)
                try:
                    await client.get_workflow_handle(workflow_id).signal(StripeReportWorkflow.rows_queued)
                    return workflow_id, False
                except RPCError as exc:
                    # It completed in between, so it may have missed the rows: start it again.
                    if exc.status != RPCStatusCode.NOT_FOUND:
                        raise

    outcomes = await asyncio.gather(*(start(org_id) for org_id in dict.fromkeys(org_ids)))
    started = sum(1 for _, was_started in outcomes if was_started)
    return ReportStarts([wid for wid, _ in outcomes], started, len(outcomes) - started)


async def refresh_outbox_gauges(pool: AsyncConnectionPool) -> None:
    """Set ``billing_stripe_outbox_rows`` and ``_units`` per state from PostgreSQL (one small query)."""
    async with pool.connection() as conn:
        totals = await (await conn.execute(query("report_state_totals"))).fetchall()
    for state in OUTBOX_STATES:
        found = next((t for t in totals if t["state"] == state), None)
        STRIPE_OUTBOX.labels(state).set(found["reports"] if found else 0)
        STRIPE_OUTBOX_UNITS.labels(state).set(found["quantity"] if found else 0)
