"""``notify/{id}``: deliver one notification to BILLING_NOTIFY_URL, retrying with backoff for days.

And ``notifications-dispatch``: the minutely schedule's run that starts the delivery workflows of
notifications recorded without one (payment and plan changes, and any whose writer stopped between
its commit and the start).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

from billing.models.contracts import NotificationContract
from billing.models.notify import (
    DeliveryResult,
    DispatchInput,
    DispatchResult,
    NotificationFailedInput,
    NotifyInput,
)
from workflows.common import run_db_activity


@workflow.defn
class NotifyWorkflow:
    """One signed POST per attempt, the same ``webhook-id`` each time, until a 2xx or the window ends.

    The retry interval doubles from ``first_retry_seconds`` up to ``max_retry_seconds``, so a
    receiver down for hours is tried again within that interval of coming back. After
    ``give_up_after_hours`` the notification is recorded as ``failed`` (alerted on).
    """

    @workflow.run
    async def run(self, request: NotifyInput) -> DeliveryResult:
        workflow.set_current_details(f"Delivering notification {request.notification_id}")
        try:
            result = await workflow.execute_activity_method(
                NotificationContract.deliver_notification,
                request,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(hours=request.give_up_after_hours),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=request.first_retry_seconds),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=request.max_retry_seconds),
                    non_retryable_error_types=["InvalidInput"],
                ),
            )
        except ActivityError as exc:
            reason = str(exc.cause) if exc.cause is not None else str(exc)
            workflow.set_current_details(f"Gave up on notification {request.notification_id}: {reason}")
            return await run_db_activity(
                NotificationContract.mark_notification_failed,
                NotificationFailedInput(notification_id=request.notification_id, error=reason[:500]),
            )
        workflow.set_current_details(f"Notification {request.notification_id}: {result.outcome}")
        return result


@workflow.defn
class NotificationDispatchWorkflow:
    """Start ``notify/{id}`` for every notification still only recorded (one page per run)."""

    @workflow.run
    async def run(self, request: DispatchInput) -> DispatchResult:
        workflow.set_current_details("Starting delivery of recorded notifications")
        result = await run_db_activity(NotificationContract.dispatch_notifications, request)
        workflow.set_current_details(
            f"{result.started} delivery workflows started, {result.not_configured} not configured"
        )
        return result
