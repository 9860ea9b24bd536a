"""Workflow IDs. They are part of the product contract: operators search the Temporal UI by them."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_uuid(text: str) -> str:
    """``text`` as a UUID in canonical form (lower case, hyphenated); ValueError when it is not one.

    The one check of an org or project id at every boundary (API paths, the quota fast path, the
    CLI, webhook metadata, activity input); each turns the ValueError into its own kind of refusal.
    """
    if _CANONICAL_UUID.fullmatch(text):
        return text  # what str(uuid.UUID(text)) gives, at a tenth of the cost (the quota check's path)
    return str(uuid.UUID(text))


def monthly_reset_id(org_id: str, month: str) -> str:
    """``monthly-reset/{org_id}/{YYYY-MM}``: one reset per organization and month, ever."""
    return f"monthly-reset/{org_id}/{month}"


def usage_sync_id(batch: str) -> str:
    """``usage-sync/{batch}``: a repeated batch is the same workflow."""
    return f"usage-sync/{batch}"


def stripe_report_id(org_id: str, hour: datetime) -> str:
    """``stripe-report/{org_id}/{YYYY-MM-DDTHH}``: one report per organization and UTC hour."""
    return f"stripe-report/{org_id}/{hour.astimezone(UTC):%Y-%m-%dT%H}"


def org_billing_id(org_id: str) -> str:
    """``org-billing/{org_id}``: the one long-lived workflow that owns an org's billing state."""
    return f"org-billing/{org_id}"


def notify_id(notification_id: int) -> str:
    """``notify/{notification_id}``: one delivery workflow per notification."""
    return f"notify/{notification_id}"
