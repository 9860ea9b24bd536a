"""Workflow IDs. They are part of the product contract: operators search the Temporal UI by them."""

from __future__ import annotations

from datetime import UTC, datetime


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
