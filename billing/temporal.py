"""Temporal client, search attributes, schedules, and the starters every caller shares."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

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
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDReusePolicy,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import WorkflowAlreadyStartedError

from billing.config import Settings
from billing.errors import ConfigError
from billing.ids import monthly_reset_id
from billing.models import MonthlyCloseInput, MonthlyResetInput, RetentionInput

ORG_ID = SearchAttributeKey.for_keyword("BillingOrgId")
MONTH = SearchAttributeKey.for_keyword("BillingMonth")
PAYMENT_STATUS = SearchAttributeKey.for_keyword("PaymentStatus")
SEARCH_ATTRIBUTES = (ORG_ID, MONTH, PAYMENT_STATUS)


async def connect(settings: Settings, *, wait_seconds: float = 10.0) -> Client:
    """A client with the pydantic data converter; ConfigError naming TEMPORAL_ADDRESS if unreachable."""
    try:
        return await asyncio.wait_for(
            Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=pydantic_data_converter,
            ),
            wait_seconds,
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "timed out"
        raise ConfigError(
            "TEMPORAL_ADDRESS", f"Temporal at {settings.temporal_address} does not answer ({reason})"
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
    workflow: str
    workflow_id: str
    cron: str
    arg: object
    summary: str


def scheduled_jobs() -> list[ScheduledJob]:
    """The contract's schedules. Temporal appends the fire time to each workflow ID."""
    from billing.models_stripe import StorageOverageInput
    from billing.models_sync import PullSyncInput

    return [
        ScheduledJob(
            "usage-sync-hourly",
            "PullUsageSyncWorkflow",
            "usage-sync/pull",
            "5 * * * *",
            PullSyncInput(),
            "Pull counter rows from BILLING_METRICS_SOURCE_URL and apply them",
        ),
        ScheduledJob(
            "storage-overage-hourly",
            "StorageOverageWorkflow",
            "storage-overage",
            "15 * * * *",
            StorageOverageInput(),
            "Queue one storage_gb_hour report per paid org over its storage limit",
        ),
        ScheduledJob(
            "monthly-close",
            "MonthlyCloseWorkflow",
            "monthly-close",
            "10 0 1 * *",
            MonthlyCloseInput(),
            "Start monthly-reset/{org}/{month} for every org with usage last month",
        ),
        ScheduledJob(
            "retention-daily",
            "RetentionWorkflow",
            "retention",
            "40 3 * * *",
            RetentionInput(),
            "Purge staged batches and processed webhook events older than BILLING_RETENTION",
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
    """The outcome of asking for a monthly reset: started now, or which state the existing one is in."""

    workflow_id: str
    started: bool
    status: WorkflowExecutionStatus | None


async def start_monthly_reset(client: Client, task_queue: str, org_id: str, month: str) -> ResetStart:
    """Start ``monthly-reset/{org}/{month}`` unless it exists; its ID may never be reused.

    The SQL claim is the real exactly-once guard (it outlives Temporal's retention); rejecting the
    duplicate ID keeps a second workflow from even starting.
    """
    workflow_id = monthly_reset_id(org_id, month)
    try:
        await client.start_workflow(
            "MonthlyResetWorkflow",
            MonthlyResetInput(org_id=org_id, month=month),
            id=workflow_id,
            task_queue=task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(ORG_ID, org_id), SearchAttributePair(MONTH, month)]
            ),
            static_summary=f"Close the month before {month} for org {org_id}",
        )
        return ResetStart(workflow_id, True, WorkflowExecutionStatus.RUNNING)
    except WorkflowAlreadyStartedError:
        description = await client.get_workflow_handle(workflow_id).describe()
        return ResetStart(workflow_id, False, description.status)
