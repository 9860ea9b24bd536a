"""One organization's billing picture, as ``GET /v1/orgs/{id}`` and ``billing status`` show it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio.client import Client

from billing.db.sql import query
from billing.domain.months import parse_month
from billing.models.org_billing import OrgBillingView
from billing.read.humanize import plural, verb


class MeterUsage(BaseModel):
    """This month's usage of one meter against the plan's included quantity."""

    tag: str
    kind: str
    limit_name: str
    used: int
    included: int | None
    over_by: int
    excess: bool


class ReportCount(BaseModel):
    """Queued Stripe overage of one state: pending, waiting_for_customer, sending, sent, sent_late,
    uncertain, failed or voided."""

    status: str
    reports: int
    quantity: int
    last_reason: str | None


class WorkflowSummary(BaseModel):
    """One of the org's workflows, as listed by the ``BillingOrgId`` search attribute."""

    workflow_id: str
    workflow_type: str
    status: str
    started_at: datetime | None


class OrgStatus(BaseModel):
    """Everything an operator or the finance team asks first about an org."""

    org_id: str
    name: str | None
    plan: str
    payment_status: str
    payment_status_reason: str | None
    pending_plan: str | None
    period_end: datetime | None
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    month: str
    usage: list[MeterUsage]
    flagged_projects: list[dict[str, str]]
    stripe_reports: list[ReportCount]
    stripe_reporting: str
    # Stripe's asynchronous meter errors: the org's own, and recent ones no org could be matched to.
    stripe_meter_errors: list[dict[str, Any]] = []
    # The newest operator acts on the org's report rows (void, mark sent, resend): who, when, why.
    stripe_report_actions: list[dict[str, Any]] = []
    recent_resets: list[str]
    # Recent Stripe events recorded but not applied on purpose (mismatch, ignored), with why.
    webhook_events_not_applied: list[dict[str, str]] = []
    workflows: list[WorkflowSummary] = []
    # The org-billing workflow's `state` query, when that workflow exists and answers.
    payment_state: OrgBillingView | None = None
    # Set when Temporal could not be asked: the rest still comes from PostgreSQL.
    temporal_error: str | None = None


async def load_org_status(
    pool: AsyncConnectionPool, org_id: str, month: str, *, stripe_configured: bool
) -> OrgStatus | None:
    """The org's status from PostgreSQL for ``month`` (``YYYY-MM``); None for an unknown org."""
    params = {"org_id": org_id, "month": parse_month(month)}
    async with pool.connection() as conn:
        billing = await (await conn.execute(query("org_billing"), params)).fetchone()
        if billing is None:
            return None
        usage = await (await conn.execute(query("org_month_usage"), params)).fetchall()
        flags = await (await conn.execute(query("org_flagged_projects"), params)).fetchall()
        reports = await (await conn.execute(query("org_report_counts"), params)).fetchall()
        resets = await (await conn.execute(query("org_resets"), params)).fetchall()
        not_applied = await (await conn.execute(query("org_webhook_problems"), params)).fetchall()
        meter_errors = await (await conn.execute(query("meter_errors_of_org"), params)).fetchall()
        actions = await (
            await conn.execute(query("report_actions_of_org"), {**params, "limit": 10})
        ).fetchall()
    pending = sum(r["reports"] for r in reports if r["status"] == "pending")
    if not stripe_configured and pending:
        reporting = (
            f"STRIPE_API_KEY is not set: {plural(pending, 'report')} "
            f"{verb(pending, 'waits', 'wait')} in the outbox as pending, none lost"
        )
    elif not stripe_configured:
        reporting = "STRIPE_API_KEY is not set: overage will wait in the outbox until it is"
    else:
        reporting = "enabled"
    return OrgStatus(
        **{key: billing[key] for key in billing if key in OrgStatus.model_fields},
        month=month,
        usage=[MeterUsage(**row) for row in usage],
        flagged_projects=[dict(row) for row in flags],
        stripe_reports=[ReportCount(**row) for row in reports],
        stripe_reporting=reporting,
        stripe_meter_errors=[dict(row) for row in meter_errors],
        stripe_report_actions=[dict(row) for row in actions],
        recent_resets=[row["month"] for row in resets],
        webhook_events_not_applied=[
            {key: str(row[key]) for key in ("event_id", "event_type", "status", "detail")}
            for row in not_applied
        ],
    )


async def list_org_workflows(client: Client, org_id: str, limit: int = 20) -> list[WorkflowSummary]:
    """The org's most recent workflows, found by the ``BillingOrgId`` search attribute."""
    found: list[WorkflowSummary] = []
    async for execution in client.list_workflows(f"BillingOrgId = '{org_id}'", limit=limit):
        found.append(
            WorkflowSummary(
                workflow_id=execution.id,
                workflow_type=execution.workflow_type,
                status=execution.status.name if execution.status else "UNKNOWN",
                started_at=execution.start_time,
            )
        )
    return found


async def add_temporal_view(status: OrgStatus, client: Client | None) -> None:
    """Fill the org's workflows and payment state machine from Temporal, or say why they are missing.

    An on-call engineer needs the org's numbers most when Temporal is in trouble: its failure never
    hides what PostgreSQL knows.
    """
    from billing.orchestration.temporal import query_org_billing_state

    if client is None:
        status.temporal_error = "Temporal is not reachable"
        return
    try:
        status.workflows = await list_org_workflows(client, status.org_id)
        status.payment_state = await query_org_billing_state(client, status.org_id)
    except Exception as exc:
        status.temporal_error = f"Temporal did not answer ({type(exc).__name__}: {exc})"
