"""Notifications to the product: dispatch to ``notify/{id}`` workflows, signed delivery, listing.

A notification is a row of ``notifications`` (sql/0015) written in the same transaction as the change
it tells of; its key makes it exactly-once. Delivery is an HTTP POST to BILLING_NOTIFY_URL signed by
the Standard Webhooks scheme: ``webhook-id`` is the row's ``webhook_id`` (the same on every attempt,
so a receiver can drop duplicates), ``webhook-timestamp`` the attempt's time, ``webhook-signature``
``v1,<base64 HMAC-SHA256>`` with BILLING_NOTIFY_SECRET.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool
from standardwebhooks.webhooks import Webhook
from temporalio.client import Client

from billing.core.config import Settings
from billing.db.sql import query
from billing.models.notify import DispatchResult
from billing.orchestration.temporal import start_notification_delivery

NOT_CONFIGURED = "BILLING_NOTIFY_URL or BILLING_NOTIFY_SECRET is not set: recorded, not delivered"


def delivery_configured(settings: Settings) -> bool:
    """Whether notifications are sent (both the URL and the signing secret are set)."""
    return settings.notify_url is not None and settings.notify_secret is not None


def body_of(row: dict[str, Any]) -> str:
    """The JSON body of a notification, the same bytes on every attempt (Standard Webhooks' shape)."""
    return json.dumps(
        {"type": row["kind"], "timestamp": row["created_at"].isoformat(), "data": row["payload"]},
        sort_keys=True,
        separators=(",", ":"),
    )


def signed_headers(secret: str, webhook_id: str, sent_at: datetime, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt."""
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, sent_at, body),
    }


@dataclass(frozen=True)
class Dispatcher:
    """Starts ``notify/{id}`` for recorded notifications (after the writing transaction committed)."""

    settings: Settings
    pool: AsyncConnectionPool
    client: Client
    task_queue: str

    async def dispatch(self, ids: list[int] | None, limit: int = 500) -> DispatchResult:
        """Hand the recorded ones among ``ids`` (or all, oldest first, up to ``limit``) to Temporal.

        A workflow already started for an id is fine (WorkflowAlreadyStartedError: another dispatcher
        won); the row moves to ``delivering`` only if still ``recorded``, so a delivery that finished
        first is never undone. Without BILLING_NOTIFY_URL/SECRET, rows become ``not_configured``.
        """
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(query("notifications_to_dispatch"), {"ids": ids, "limit": limit})
            ).fetchall()
        waiting = [row["id"] for row in rows]
        orgs = {row["id"]: row["org_id"] for row in rows}
        if not waiting:
            return DispatchResult()
        if not delivery_configured(self.settings):
            await self._mark(waiting, "not_configured", NOT_CONFIGURED)
            return DispatchResult(not_configured=len(waiting))
        for notification_id in waiting:
            await start_notification_delivery(
                self.client,
                self.task_queue,
                notification_id,
                orgs[notification_id],
                first_retry_seconds=self.settings.notify_retry_seconds,
            )
        await self._mark(waiting, "delivering", None)
        return DispatchResult(started=len(waiting))

    async def _mark(self, ids: list[int], state: str, reason: str | None) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                query("notifications_mark_dispatched"), {"ids": ids, "state": state, "reason": reason}
            )


async def org_notifications(pool: AsyncConnectionPool, org_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """An org's notifications, newest first, with their delivery state (JSON-ready)."""
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(query("org_notifications"), {"org_id": org_id, "limit": limit})
        ).fetchall()
    return [
        {
            **row,
            "created_at": row["created_at"].isoformat(),
            "delivered_at": row["delivered_at"].isoformat() if row["delivered_at"] else None,
        }
        for row in rows
    ]
