"""Models of the notification workflows (see workflows/notify.py)."""

from __future__ import annotations

from pydantic import Field

from billing.models import Model


class NotifyInput(Model):
    """Deliver notification ``notification_id``; retries start ``first_retry_seconds`` apart and double."""

    notification_id: int = Field(ge=1)
    first_retry_seconds: float = Field(default=5.0, gt=0, le=3_600)
    max_retry_seconds: float = Field(default=900.0, gt=0, le=86_400)
    give_up_after_hours: float = Field(default=72.0, gt=0, le=24 * 30)


class DeliveryResult(Model):
    """How a delivery ended: ``delivered``, ``already_delivered`` or ``not_configured``."""

    notification_id: int
    outcome: str
    attempts: int = 0


class NotificationFailedInput(Model):
    """Record that the delivery window passed without an answer the receiver accepted."""

    notification_id: int
    error: str | None = None


class DispatchInput(Model):
    """Hand recorded notifications to their workflows: the given ids, or every waiting one (a page)."""

    ids: list[int] | None = None
    limit: int = Field(default=500, ge=1, le=10_000)


class DispatchResult(Model):
    """How many were handed to Temporal (``started``) or recorded as not configured."""

    started: int = 0
    not_configured: int = 0
