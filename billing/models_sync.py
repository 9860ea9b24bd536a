"""Models of the usage-sync workflows (see workflows/usage_sync.py)."""

from __future__ import annotations

from billing.models import Model


class PullSyncInput(Model):
    """Run one pull of the core service's metrics table (the hourly schedule's argument)."""
