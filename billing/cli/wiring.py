"""Worker wiring: which workflows and activities run on the billing task queue.

The composition root of the worker (``billing worker``, ``python worker.py``): it alone imports both
``workflows/`` and ``activities/``. Scale out by starting more workers on the same task queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.worker import Interceptor, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.notifications import NotificationActivities
from activities.payments import PaymentActivities
from activities.resets import ResetActivities
from activities.retention import RetentionActivities
from activities.stripe_reports import StripeReportActivities
from activities.usage import UsageActivities
from billing.adapters.stripe_client import make_stripe_client
from billing.core.config import Settings
from billing.models.contracts import activity_names
from workflows.monthly_close import MonthlyCloseWorkflow
from workflows.monthly_reset import MonthlyResetWorkflow
from workflows.notify import NotificationDispatchWorkflow, NotifyWorkflow
from workflows.org_billing import OrgBillingWorkflow
from workflows.retention import RetentionWorkflow
from workflows.stripe_report import StorageOverageWorkflow, StripeReportWorkflow
from workflows.usage_sync import PullUsageSyncWorkflow, UsageSyncWorkflow

WORKFLOWS: Sequence[type] = (
    MonthlyResetWorkflow,
    MonthlyCloseWorkflow,
    UsageSyncWorkflow,
    PullUsageSyncWorkflow,
    OrgBillingWorkflow,
    StripeReportWorkflow,
    StorageOverageWorkflow,
    NotifyWorkflow,
    NotificationDispatchWorkflow,
    RetentionWorkflow,
)


def activities(
    settings: Settings, pool: AsyncConnectionPool, client: Client, task_queue: str
) -> list[Callable[..., Any]]:
    """Every activity, bound to its dependencies."""
    resets = ResetActivities(pool, client, task_queue)
    usage = UsageActivities(settings, pool, client, task_queue)
    stripe_client = make_stripe_client(settings)  # one per worker, shared by every Stripe call
    payments = PaymentActivities(pool, stripe_client)
    reports = StripeReportActivities(
        pool,
        client,
        task_queue,
        stripe_client,
        horizon=settings.report_horizon,
        grace=settings.finalization_grace,
    )
    notifications = NotificationActivities(settings, pool, client, task_queue)
    retention = RetentionActivities(settings, pool)
    implementations = (resets, usage, payments, reports, retention, notifications)
    return [getattr(impl, name) for impl in implementations for name in activity_names(type(impl))]


# The sandbox re-imports a workflow's modules for every workflow run unless they are passed through.
# Only the pure domain modules and the models crossing Temporal are (no I/O, no clock: the wall clock
# lives in billing.core.clock), so sharing them across runs is safe and saves most of the sandbox's CPU
# per workflow; anything else a workflow imported would be re-imported under the sandbox's checks.
SANDBOX_PASSED_THROUGH = ("pydantic", "pydantic_core", "annotated_types", "billing.domain", "billing.models")


def build_worker(
    settings: Settings,
    pool: AsyncConnectionPool,
    client: Client,
    *,
    task_queue: str | None = None,
    interceptors: Sequence[Interceptor] = (),
) -> Worker:
    """A worker for ``task_queue`` (default BILLING_TASK_QUEUE) running every workflow and activity.

    ``interceptors`` is a hook for tests (the suite's injected activity delay); production passes none.
    """
    queue = task_queue or settings.task_queue
    return Worker(
        client,
        task_queue=queue,
        workflows=list(WORKFLOWS),
        activities=activities(settings, pool, client, queue),
        max_concurrent_activities=50,
        interceptors=list(interceptors),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*SANDBOX_PASSED_THROUGH)
        ),
    )
