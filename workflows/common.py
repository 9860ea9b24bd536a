"""Retry and timeout policy shared by the workflows."""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

ResultT = TypeVar("ResultT")

# Database activities are transactions: retrying one is always safe, so retry until it works and
# let operators see the failing attempts in the UI rather than fail the workflow half-way.
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(minutes=1)
)
DB_TIMEOUT = timedelta(minutes=2)


async def run_db_activity(name: str, arg: object, result_type: type[ResultT]) -> ResultT:
    """Run a database activity (one transaction) by name with the shared timeout and retry policy."""
    return await workflow.execute_activity(
        name, arg, result_type=result_type, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY
    )
