"""Models of the Stripe reporting workflows (see workflows/stripe_report.py)."""

from __future__ import annotations

from billing.models import Model


class StorageOverageInput(Model):
    """Queue the storage overage of one UTC hour (``YYYY-MM-DDTHH``); default: the hour the run starts."""

    hour: str | None = None
