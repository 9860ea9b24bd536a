"""Every activity's name, argument and result, declared once: what workflows call and workers register.

Workflows call an activity through its declaration here (``workflow.execute_activity_method(
UsageContract.apply_usage_batch, ...)``), so they import no side effect; the classes of ``activities/``
subclass these and implement each method under the same name (``@activity.defn`` names an activity after
its method), and the worker registers those. The names are those of the recorded histories: renaming a
method renames the activity, which running workflows and tests/histories/ would no longer find.
"""

from __future__ import annotations

import inspect

from temporalio import activity

from billing.models import (
    MonthlyResetInput,
    MonthlyResetResult,
    PurgeInput,
    PurgeResult,
    StartResetsInput,
    StartResetsResult,
)
from billing.models.notify import (
    DeliveryResult,
    DispatchInput,
    DispatchResult,
    NotificationFailedInput,
    NotifyInput,
)
from billing.models.org_billing import (
    MarkWebhookEventsInput,
    MarkWebhookEventsResult,
    OrgBillingRow,
    OrgRef,
    ResolveInvoiceKindInput,
    ResolveInvoiceKindResult,
    ResolvePlanInput,
    ResolvePlanResult,
    StripeCallResult,
    SubscriptionChange,
    SyncOrgBillingInput,
    SyncOrgBillingResult,
)
from billing.models.stripe_report import (
    QueueStorageOverageInput,
    QueueStorageOverageResult,
    SendReportsInput,
    SendReportsResult,
    StartPendingReportsInput,
    StartReportsResult,
    StartStripeReportsInput,
)
from billing.models.usage_sync import (
    AdvanceWatermarkInput,
    AdvanceWatermarkResult,
    ApplyBatchInput,
    ApplyBatchResult,
    EnsureResetsInput,
    EnsureResetsResult,
    PullStageInput,
    PullStageResult,
    ReadyBatchesInput,
    ReadyBatchesResult,
)


class ResetContract:
    """The monthly reset (activities/resets.py)."""

    @activity.defn
    async def close_org_month(self, request: MonthlyResetInput) -> MonthlyResetResult:
        """Claim and close the org's previous month in one transaction."""
        raise NotImplementedError

    @activity.defn
    async def start_monthly_resets(self, request: StartResetsInput) -> StartResetsResult:
        """Start ``monthly-reset/{org}/{month}`` for one page of orgs."""
        raise NotImplementedError


class UsageContract:
    """The usage sync, push and pull (activities/usage.py)."""

    @activity.defn
    async def ensure_batch_resets(self, request: EnsureResetsInput) -> EnsureResetsResult:
        """Open the months a batch needs (monthly resets), waiting for them a bounded time."""
        raise NotImplementedError

    @activity.defn
    async def apply_usage_batch(self, request: ApplyBatchInput) -> ApplyBatchResult:
        """Apply one staged batch in one transaction."""
        raise NotImplementedError

    @activity.defn
    async def stage_pull_batch(self, request: PullStageInput) -> PullStageResult:
        """Stage the metrics table's rows changed since the watermark as a batch."""
        raise NotImplementedError

    @activity.defn
    async def pull_batches_ready(self, request: ReadyBatchesInput) -> ReadyBatchesResult:
        """Pull batches holding rows back whose months are open now."""
        raise NotImplementedError

    @activity.defn
    async def advance_pull_watermark(self, request: AdvanceWatermarkInput) -> AdvanceWatermarkResult:
        """Move the pull watermark forward (never back)."""
        raise NotImplementedError


class PaymentContract:
    """The org-billing workflow's side effects (activities/payments.py)."""

    @activity.defn
    async def load_org_billing(self, request: OrgRef) -> OrgBillingRow:
        """The org's billing row, to seed a new state machine."""
        raise NotImplementedError

    @activity.defn
    async def sync_org_billing(self, request: SyncOrgBillingInput) -> SyncOrgBillingResult:
        """Write the changed billing columns and recompute quota flags, in one transaction."""
        raise NotImplementedError

    @activity.defn
    async def mark_webhook_events(self, request: MarkWebhookEventsInput) -> MarkWebhookEventsResult:
        """Record what became of processed webhook events."""
        raise NotImplementedError

    @activity.defn
    async def change_stripe_subscription(self, request: SubscriptionChange) -> StripeCallResult:
        """Schedule or revoke a downgrade in Stripe."""
        raise NotImplementedError

    @activity.defn
    async def resolve_plan(self, request: ResolvePlanInput) -> ResolvePlanResult:
        """The plan a Stripe product stands for."""
        raise NotImplementedError

    @activity.defn
    async def resolve_invoice_kind(self, request: ResolveInvoiceKindInput) -> ResolveInvoiceKindResult:
        """Whether an invoice bills the plan or metered usage."""
        raise NotImplementedError


class StripeReportContract:
    """Stripe reporting (activities/stripe_reports.py)."""

    @activity.defn
    async def send_stripe_reports(self, request: SendReportsInput) -> SendReportsResult:
        """Send one page of the org's pending outbox rows to Stripe."""
        raise NotImplementedError

    @activity.defn
    async def queue_storage_overage(self, request: QueueStorageOverageInput) -> QueueStorageOverageResult:
        """Queue the storage overage of an hour (and of missed hours before it)."""
        raise NotImplementedError

    @activity.defn
    async def start_pending_stripe_reports(self, request: StartPendingReportsInput) -> StartReportsResult:
        """Start the reports of one page of orgs with pending rows."""
        raise NotImplementedError

    @activity.defn
    async def start_stripe_reports(self, request: StartStripeReportsInput) -> StartReportsResult:
        """Start (or signal) the reports of the given orgs."""
        raise NotImplementedError


class RetentionContract:
    """The retention purge (activities/retention.py)."""

    @activity.defn
    async def purge_expired(self, request: PurgeInput) -> PurgeResult:
        """One purge pass over what BILLING_RETENTION no longer keeps."""
        raise NotImplementedError


class NotificationContract:
    """Notification delivery (activities/notifications.py)."""

    @activity.defn
    async def dispatch_notifications(self, request: DispatchInput) -> DispatchResult:
        """Start the delivery workflows of recorded notifications."""
        raise NotImplementedError

    @activity.defn
    async def deliver_notification(self, request: NotifyInput) -> DeliveryResult:
        """POST one signed notification."""
        raise NotImplementedError

    @activity.defn
    async def mark_notification_failed(self, request: NotificationFailedInput) -> DeliveryResult:
        """Record a notification given up on."""
        raise NotImplementedError


def activity_names(implementation: type) -> list[str]:
    """The activities ``implementation`` (a class of activities/) implements: its contract's methods."""
    contracts = [base for base in implementation.__mro__ if base in CONTRACTS]
    if len(contracts) != 1:
        raise TypeError(f"{implementation.__name__} must implement exactly one contract, not {contracts}")
    return [name for name, fn in vars(contracts[0]).items() if inspect.iscoroutinefunction(fn)]


CONTRACTS: tuple[type, ...] = (
    ResetContract,
    UsageContract,
    PaymentContract,
    StripeReportContract,
    RetentionContract,
    NotificationContract,
)
