"""The Temporal client side, in one place: connect, search attributes, schedules, and every start,
signal, update and query the project makes from outside a workflow.

Sections, one per workflow family: monthly reset; usage sync (a pushed batch, a pull now); Stripe
reports; the org workflow (signal-with-start, update-with-start, the ``state`` query); notifications
(``notify/{id}``). What the callers do around a start (staging a batch, choosing the notifications to
deliver) stays with them: ``billing.orchestration.usage_batches``, ``billing.adapters.notification_delivery``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

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
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowQueryFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode

from billing.core.clock import current_month
from billing.core.config import QUOTA_CACHE_MAX_AGE_SECONDS, Settings
from billing.core.errors import ConfigError
from billing.domain.hours import hour_key
from billing.domain.ids import monthly_reset_id, notify_id, org_billing_id, stripe_report_id, usage_sync_id
from billing.domain.months import month_key, parse_month
from billing.domain.stripe_events import BillingEvent
from billing.models import MonthlyCloseInput, MonthlyResetInput, RetentionInput
from billing.models.notify import NotifyInput
from billing.models.org_billing import OperatorRequest, OrgBillingInput, OrgBillingView
from billing.models.search_attributes import MONTH, ORG_ID, PAYMENT_STATUS, SEARCH_ATTRIBUTES
from billing.models.stripe_report import ReportTuning, StripeReportInput
from billing.models.usage_sync import (
    INPUT_ERROR,
    PARTIAL_BATCH_ERROR,
    PullSyncInput,
    PullSyncResult,
    UsageSyncInput,
    UsageSyncResult,
)
from workflows.monthly_close import MonthlyCloseWorkflow
from workflows.monthly_reset import MonthlyResetWorkflow
from workflows.notify import NotificationDispatchWorkflow, NotifyWorkflow
from workflows.org_billing import OrgBillingWorkflow
from workflows.retention import RetentionWorkflow
from workflows.stripe_report import StorageOverageWorkflow, StripeReportWorkflow
from workflows.usage_sync import PullUsageSyncWorkflow, UsageSyncWorkflow

log = logging.getLogger(__name__)

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


# --- usage sync: a pushed batch, a pull now ---------------------------------------------------


def partial_result(error: WorkflowFailureError) -> UsageSyncResult | None:
    """The result carried by a batch workflow that failed only because it left orgs out."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.type == PARTIAL_BATCH_ERROR and cause.details:
        return UsageSyncResult.model_validate(cause.details[0])
    return None


class SyncStillRunning(Exception):
    """``usage-sync/{batch}`` did not finish within the caller's bound; it goes on running."""

    def __init__(self, batch_id: str, seconds: float) -> None:
        super().__init__(f"usage-sync/{batch_id} did not finish within {seconds:g} s; it is still running")
        self.batch_id = batch_id
        self.seconds = seconds


class BatchRefused(Exception):
    """``usage-sync/{batch}`` failed for its input (non-retryable); no retry of the same body helps."""


async def run_usage_sync(
    client: Client,
    task_queue: str,
    batch_id: str,
    *,
    reset_wait_seconds: float = 60.0,
    answer_within: float | None = None,
) -> UsageSyncResult:
    """Run ``usage-sync/{batch_id}`` (or join the run that exists) and return its result.

    A batch whose run completed is never run again: its result is fetched. A run that failed (it
    held rows back because their org's month is not opened yet, or it was terminated) may run again,
    and the new run applies only what is still missing. Waits at most ``answer_within`` seconds
    (SyncStillRunning after that; the run goes on, and the same batch later joins or reads it back).
    BatchRefused when the run failed for its input.
    """
    workflow_id = usage_sync_id(batch_id)
    try:
        handle = await client.start_workflow(
            UsageSyncWorkflow.run,
            UsageSyncInput(batch_id=batch_id, reset_wait_seconds=reset_wait_seconds),
            id=workflow_id,
            task_queue=task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"Apply usage batch {batch_id}",
        )
    except WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle(workflow_id, result_type=UsageSyncResult)
    try:
        if answer_within is None:
            return await handle.result()
        return await asyncio.wait_for(handle.result(), answer_within)
    except TimeoutError:
        raise SyncStillRunning(batch_id, answer_within or 0.0) from None
    except WorkflowFailureError as exc:
        partial = partial_result(exc)
        if partial is not None:
            return partial
        cause = exc.cause
        while cause is not None:
            if isinstance(cause, ApplicationError) and cause.type == INPUT_ERROR:
                raise BatchRefused(cause.message) from None
            cause = cause.cause
        raise


async def run_pull_now(settings: Settings) -> PullSyncResult:
    """Run ``PullUsageSyncWorkflow`` now as ``usage-sync/pull-now-{UTC second}`` and wait for it.

    Two requests in the same second share one run; a pull running beside the hourly one is harmless
    (rows read twice diff to nothing, the watermark only moves forward).
    """
    client = await connect(settings)
    batch = f"pull-now-{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"
    return await client.execute_workflow(
        PullUsageSyncWorkflow.run,
        PullSyncInput(),
        id=usage_sync_id(batch),
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary="Pull counter rows from BILLING_METRICS_SOURCE_URL now (billing sync)",
    )


# --- Stripe reports ---------------------------------------------------------------------------


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


# --- the org workflow: signal, update, query --------------------------------------------------


QUERY_TIMEOUT = timedelta(seconds=5)


async def signal_org_billing(
    client: Client,
    task_queue: str,
    org_id: str,
    event: BillingEvent,
    *,
    rpc_timeout: timedelta | None = None,
) -> str:
    """Signal a Stripe event to ``org-billing/{org_id}``, starting it first if it is not running; returns
    its run id.

    Signal-with-start is one atomic request: when it returns, Temporal has durably recorded the
    signal, so the caller may acknowledge (the webhook answers 200 only then).
    """
    handle = await client.start_workflow(
        OrgBillingWorkflow.run,
        OrgBillingInput(org_id=org_id),
        id=org_billing_id(org_id),
        task_queue=task_queue,
        # The SDK takes the signal's name; @workflow.signal names it after its method.
        start_signal=OrgBillingWorkflow.stripe_event.__name__,
        start_signal_args=[event],
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(ORG_ID, org_id), SearchAttributePair(PAYMENT_STATUS, "ok")]
        ),
        static_summary=f"Payment state machine of org {org_id}",
        rpc_timeout=rpc_timeout,
    )
    return handle.result_run_id or ""


async def operator_update(
    client: Client,
    task_queue: str,
    org_id: str,
    action: Literal["block", "unblock"],
    request: OperatorRequest,
    *,
    rpc_timeout: timedelta | None = None,
) -> OrgBillingView:
    """`billing block` / `billing unblock`: a Temporal Update of ``org-billing/{org_id}``, starting the
    workflow first if it is not running (update-with-start, one request).

    Returns the org's state once the billing row and the quota flags are committed and every API
    process enforces them: API processes answer quota checks from memory that holds every flag
    committed ``QUOTA_CACHE_MAX_AGE_SECONDS`` ago (api/quota_cache.py), so the call waits that long
    after the update's answer. The next quota check of any project of the org then sees the new status.
    A retried call with the same `request.request_id` is applied once.
    """
    start = WithStartWorkflowOperation(
        OrgBillingWorkflow.run,
        OrgBillingInput(org_id=org_id),
        id=org_billing_id(org_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(ORG_ID, org_id), SearchAttributePair(PAYMENT_STATUS, "ok")]
        ),
        static_summary=f"Payment state machine of org {org_id}",
    )
    update = OrgBillingWorkflow.block if action == "block" else OrgBillingWorkflow.unblock
    view = await client.execute_update_with_start_workflow(
        update, request, start_workflow_operation=start, rpc_timeout=rpc_timeout
    )
    await asyncio.sleep(QUOTA_CACHE_MAX_AGE_SECONDS)
    return view


async def query_org_billing_state(client: Client, org_id: str) -> OrgBillingView | None:
    """The org workflow's `state`, or None when it does not exist or cannot answer right now.

    Never raises for a missing workflow or an unresponsive worker: the status of an org must not
    depend on it.
    """
    handle = client.get_workflow_handle(org_billing_id(org_id))
    try:
        return await handle.query(OrgBillingWorkflow.state, rpc_timeout=QUERY_TIMEOUT)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            log.warning("org-billing/%s did not answer the state query: %s", org_id, exc)
        return None
    except WorkflowQueryFailedError as exc:
        log.warning("org-billing/%s failed the state query: %s", org_id, exc)
        return None


# --- notifications ----------------------------------------------------------------------------


async def start_notification_delivery(
    client: Client, task_queue: str, notification_id: int, org_id: str, *, first_retry_seconds: float
) -> bool:
    """Start ``notify/{notification_id}``; False when it was already started (another dispatcher won)."""
    try:
        await client.start_workflow(
            NotifyWorkflow.run,
            NotifyInput(notification_id=notification_id, first_retry_seconds=first_retry_seconds),
            id=notify_id(notification_id),
            task_queue=task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes([SearchAttributePair(ORG_ID, org_id)]),
            static_summary=f"Deliver notification {notification_id} to BILLING_NOTIFY_URL",
        )
    except WorkflowAlreadyStartedError:
        return False
    return True
