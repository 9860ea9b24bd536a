"""Temporal client, search attributes, schedules, and the monthly reset's starter.

The other client-side starters sit beside what they start, in this package: ``reporting`` (Stripe
reports), ``org_billing`` (the org workflow's signal, update and query), ``usage_batches`` (a pushed
batch) and ``usage_sync`` (a pull now); ``billing.adapters.notifications`` starts ``notify/{id}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowExecutionStatus,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDReusePolicy,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.runtime import Runtime

from billing.core.clock import current_month
from billing.core.config import Settings
from billing.core.errors import ConfigError
from billing.domain.ids import monthly_reset_id
from billing.domain.months import parse_month
from billing.models import MonthlyCloseInput, MonthlyResetInput, RetentionInput
from billing.models.search_attributes import MONTH, ORG_ID, SEARCH_ATTRIBUTES
from workflows.monthly_close import MonthlyCloseWorkflow
from workflows.monthly_reset import MonthlyResetWorkflow
from workflows.notify import NotificationDispatchWorkflow
from workflows.retention import RetentionWorkflow
from workflows.stripe_report import StorageOverageWorkflow
from workflows.usage_sync import PullUsageSyncWorkflow

# Starting a workflow is one RPC; a handful at once keeps a page of starts fast without flooding the
# frontend (resets of a month close, resets a batch needs, Stripe reports).
CONCURRENT_STARTS = 16


async def connect(
    settings: Settings, *, wait_seconds: float = 10.0, runtime: Runtime | None = None
) -> Client:
    """A client with the pydantic data converter; ConfigError naming TEMPORAL_ADDRESS if unreachable.

    It carries the OpenTelemetry tracing interceptor (so do the workers built from it); ``runtime``
    is a Temporal runtime of its own, e.g. one that serves the SDK's metrics (billing.observability.metrics).
    """
    from billing.observability.tracing import tracing_interceptor

    try:
        return await asyncio.wait_for(
            Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=pydantic_data_converter,
                interceptors=[tracing_interceptor()],
                runtime=runtime,
            ),
            wait_seconds,
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        # The SDK's transport errors (`tonic::transport::Error(Transport, ConnectError(...))`) and a
        # timeout both mean nobody answers there: say that, and what usually fixes it.
        if not reason or "transport" in reason.lower() or "connect" in reason.lower():
            raise ConfigError(
                "TEMPORAL_ADDRESS",
                f"cannot reach Temporal at {settings.temporal_address} — is `make dev` running?",
            ) from None
        raise ConfigError(
            "TEMPORAL_ADDRESS", f"Temporal at {settings.temporal_address} refused the connection ({reason})"
        ) from None


async def register_search_attributes(client: Client, namespace: str) -> list[str]:
    """Register BillingOrgId, BillingMonth and PaymentStatus (Keyword); returns those newly added."""
    existing = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    known = set(existing.custom_attributes) | set(existing.system_attributes)
    missing = {key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in SEARCH_ATTRIBUTES}
    missing = {name: kind for name, kind in missing.items() if name not in known}
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
    return sorted(missing)


@dataclass(frozen=True)
class ScheduledJob:
    """One of the schedules of the contract."""

    schedule_id: str
    workflow: Callable[..., Awaitable[Any]]  # the workflow class's run method
    workflow_id: str
    cron: str
    arg: object
    summary: str


def scheduled_jobs() -> list[ScheduledJob]:
    """The contract's schedules. Temporal appends the fire time to each workflow ID."""
    from billing.models.notify import DispatchInput
    from billing.models.stripe_report import StorageOverageInput
    from billing.models.usage_sync import PullSyncInput

    return [
        ScheduledJob(
            "usage-sync-hourly",
            PullUsageSyncWorkflow.run,
            "usage-sync/pull",
            "5 * * * *",
            PullSyncInput(),
            "Pull counter rows from BILLING_METRICS_SOURCE_URL and apply them",
        ),
        ScheduledJob(
            "storage-overage-hourly",
            StorageOverageWorkflow.run,
            "storage-overage",
            "15 * * * *",
            StorageOverageInput(),
            "Queue one storage_gb_hour report per paid org over its storage limit",
        ),
        ScheduledJob(
            "monthly-close",
            MonthlyCloseWorkflow.run,
            "monthly-close",
            "10 0 1 * *",
            MonthlyCloseInput(),
            "Start monthly-reset/{org}/{month} for every org with usage last month",
        ),
        ScheduledJob(
            "retention-daily",
            RetentionWorkflow.run,
            "retention",
            "40 3 * * *",
            RetentionInput(),
            "Purge staged batches and processed webhook events older than BILLING_RETENTION",
        ),
        ScheduledJob(
            "notifications-dispatch",
            NotificationDispatchWorkflow.run,
            "notifications-dispatch",
            "* * * * *",
            DispatchInput(),
            "Start notify/{id} for notifications recorded without a delivery workflow yet",
        ),
    ]


async def ensure_schedules(client: Client, task_queue: str) -> list[str]:
    """Create the schedules, or bring existing ones up to date with this code; returns their IDs."""
    ids = []
    for job in scheduled_jobs():
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(
                job.workflow, job.arg, id=job.workflow_id, task_queue=task_queue, static_summary=job.summary
            ),
            spec=ScheduleSpec(cron_expressions=[job.cron]),
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=timedelta(days=1)),
        )
        try:
            await client.create_schedule(job.schedule_id, schedule)
        except ScheduleAlreadyRunningError:

            def replace(_: ScheduleUpdateInput, schedule: Schedule = schedule) -> ScheduleUpdate:
                return ScheduleUpdate(schedule=schedule)

            await client.get_schedule_handle(job.schedule_id).update(replace)
        ids.append(job.schedule_id)
    return ids


@dataclass(frozen=True)
class ResetStart:
    """The outcome of asking for a monthly reset: started now, or which state the existing one is in.

    ``rerun``: started now again after a run that did not complete (failed, terminated, cancelled,
    timed out).
    """

    workflow_id: str
    started: bool
    status: WorkflowExecutionStatus | None
    rerun: bool = False


# A reset run in one of these states did not complete: it may run again (the SQL claim still makes
# a completed reset once-only, even after Temporal has forgotten it).
RESET_NOT_COMPLETED = {
    WorkflowExecutionStatus.FAILED,
    WorkflowExecutionStatus.TERMINATED,
    WorkflowExecutionStatus.CANCELED,
    WorkflowExecutionStatus.TIMED_OUT,
}


class MonthNotBegun(ValueError):
    """A reset was asked for a month after the current UTC month: months are opened by time only."""


def refuse_unbegun_month(month: str, now: datetime | None = None) -> None:
    """Raise MonthNotBegun when ``month`` (YYYY-MM) is after the UTC month of ``now`` (default: the clock)."""
    current = current_month(now)
    if parse_month(month) > parse_month(current):
        raise MonthNotBegun(
            f"month {month} has not begun (it is {current} now, UTC); months are opened by time"
        )


async def start_monthly_reset(
    client: Client,
    task_queue: str,
    org_id: str,
    month: str,
    *,
    now: datetime | None = None,
    check_month: bool = True,
    eager: bool = False,
) -> ResetStart:
    """Start ``monthly-reset/{org}/{month}`` unless it exists, or again if its run did not complete.

    Refuses (MonthNotBegun) a month after the current UTC month of ``now``; callers whose month comes
    from the database or workflow clock pass ``check_month=False`` (the SQL claim refuses a month
    that has not begun by the database clock in any case, non-retryably). A completed run is never
    repeated (WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY); the SQL claim is the real
    exactly-once guard (it outlives Temporal's retention). ``eager``: ``client`` is a worker's on
    ``task_queue`` (an activity starting resets), so the run's first task comes back with the start
    and runs here, saving a round trip.
    """
    if check_month:
        refuse_unbegun_month(month, now)
    workflow_id = monthly_reset_id(org_id, month)

    async def start(policy: WorkflowIDReusePolicy) -> None:
        await client.start_workflow(
            MonthlyResetWorkflow.run,
            MonthlyResetInput(org_id=org_id, month=month),
            id=workflow_id,
            task_queue=task_queue,
            id_reuse_policy=policy,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(ORG_ID, org_id), SearchAttributePair(MONTH, month)]
            ),
            static_summary=f"Close the month before {month} for org {org_id}",
            request_eager_start=eager,
        )

    try:
        # First as if no run may exist, so that a rerun is known to be one and said so.
        await start(WorkflowIDReusePolicy.REJECT_DUPLICATE)
        return ResetStart(workflow_id, True, WorkflowExecutionStatus.RUNNING)
    except WorkflowAlreadyStartedError:
        description = await client.get_workflow_handle(workflow_id).describe()
    if description.status not in RESET_NOT_COMPLETED:
        return ResetStart(workflow_id, False, description.status)
    try:
        await start(WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY)
        return ResetStart(workflow_id, True, WorkflowExecutionStatus.RUNNING, rerun=True)
    except WorkflowAlreadyStartedError:
        # Another caller reran it first (or it completed meanwhile): report that run.
        description = await client.get_workflow_handle(workflow_id).describe()
        return ResetStart(workflow_id, False, description.status)
