"""Activities of notification delivery: dispatch recorded rows, POST one signed notification."""

from __future__ import annotations

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from billing.adapters.notification_delivery import Dispatcher, body_of, delivery_configured, signed_headers
from billing.core.clock import utcnow
from billing.core.config import Settings
from billing.db.sql import query
from billing.models.contracts import NotificationContract
from billing.models.notify import (
    DeliveryResult,
    DispatchInput,
    DispatchResult,
    NotificationFailedInput,
    NotifyInput,
)
from billing.observability.metrics import NOTIFICATION_DELIVERIES

_HTTP_TIMEOUT = 10.0


class NotificationActivities(NotificationContract):
    """Side effects of ``notify/{id}`` and of the dispatch schedule."""

    def __init__(
        self, settings: Settings, pool: AsyncConnectionPool, client: Client, task_queue: str
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.dispatcher = Dispatcher(settings, pool, client, task_queue)

    @activity.defn
    async def dispatch_notifications(self, request: DispatchInput) -> DispatchResult:
        """Start the delivery workflows of recorded notifications (idempotent: see Dispatcher)."""
        return await self.dispatcher.dispatch(request.ids, request.limit)

    @activity.defn
    async def deliver_notification(self, request: NotifyInput) -> DeliveryResult:
        """POST the notification, signed; a non-2xx answer or no answer fails the attempt (retried).

        Reads the row, calls the receiver with no connection held, then records the attempt in one
        statement. A row already delivered is not sent again.
        """
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(query("notification_get"), {"id": request.notification_id})
            ).fetchone()
        if row is None:
            raise ApplicationError(
                f"notification {request.notification_id} does not exist", non_retryable=True
            )
        if row["state"] == "delivered":
            return DeliveryResult(
                notification_id=row["id"], outcome="already_delivered", attempts=row["attempts"]
            )
        if not delivery_configured(self.settings):
            # Configured when dispatched, unset since: keep retrying, the operator may set it back.
            raise ApplicationError("BILLING_NOTIFY_URL or BILLING_NOTIFY_SECRET is not set")
        assert self.settings.notify_url is not None and self.settings.notify_secret is not None
        body = body_of(row)
        headers = signed_headers(
            self.settings.notify_secret.get_secret_value(), row["webhook_id"], utcnow(), body
        )
        error: str | None = None
        try:
            async with httpx.AsyncClient(timeout=_HTTP_TIMEOUT) as http:
                answer = await http.post(self.settings.notify_url, content=body.encode(), headers=headers)
            if not 200 <= answer.status_code < 300:
                error = f"receiver answered {answer.status_code}"
                NOTIFICATION_DELIVERIES.labels("refused").inc()
        except httpx.HTTPError as exc:
            error = f"receiver did not answer: {type(exc).__name__}"
            NOTIFICATION_DELIVERIES.labels("unreachable").inc()
        async with self.pool.connection() as conn:
            await conn.execute(
                query("notification_attempted"),
                {"id": row["id"], "delivered": error is None, "error": error},
            )
        if error is not None:
            raise ApplicationError(f"notification {row['id']} not delivered: {error}")
        NOTIFICATION_DELIVERIES.labels("delivered").inc()
        return DeliveryResult(notification_id=row["id"], outcome="delivered", attempts=row["attempts"] + 1)

    @activity.defn
    async def mark_notification_failed(self, request: NotificationFailedInput) -> DeliveryResult:
        """Record that delivery was given up (a delivered row stays delivered)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                query("notification_failed"), {"id": request.notification_id, "error": request.error}
            )
        NOTIFICATION_DELIVERIES.labels("gave_up").inc()
        return DeliveryResult(notification_id=request.notification_id, outcome="failed")
