"""Retry and timeout policy shared by the workflows."""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

# Database activities are transactions: retrying one is always safe, so retry until it works and
# let operators see the failing attempts in the UI rather than fail the workflow half-way.
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(minutes=1)
)
DB_TIMEOUT = timedelta(minutes=2)
