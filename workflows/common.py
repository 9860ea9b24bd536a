"""Retry and timeout policy shared by the workflows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.exceptions import TimeoutError as TemporalTimeoutError

ArgT = TypeVar("ArgT")
ResultT = TypeVar("ResultT")
# An activity as declared in billing.models.contracts (a method: self, then its one argument).
ActivityMethod = Callable[[Any, ArgT], Awaitable[ResultT]]

# Database activities are transactions: retrying one is always safe, so retry until it works and
# let operators see the failing attempts in the UI rather than fail the workflow half-way.
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(minutes=1)
)
DB_TIMEOUT = timedelta(minutes=2)


async def run_db_activity(activity: ActivityMethod[ArgT, ResultT], arg: ArgT) -> ResultT:
    """Run a database activity (one transaction) with the shared timeout and retry policy."""
    return await workflow.execute_activity_method(
        activity, arg, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY
    )


async def run_db_activity_local_first(activity: ActivityMethod[ArgT, ResultT], arg: ArgT) -> ResultT:
    """A short database activity tried once as a local activity, else as ``run_db_activity``.

    The local try runs in the worker that holds the workflow task, with no activity task of its own:
    about half the Temporal round trips of a workflow that runs only this (the monthly reset, 10,000
    at a month close). If it fails, the regular activity takes over, so a failure that persists is
    retried, and shown in the UI with its attempts, exactly as before. Either way the activity is one
    idempotent transaction, so running it again after a failed try is safe.
    """
    try:
        return await workflow.execute_local_activity_method(
            activity,
            arg,
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=RetryPolicy(maximum_attempts=1),
        )
    except (ActivityError, ApplicationError, TemporalTimeoutError):
        # A failed local activity may surface as its cause (ApplicationError) rather than wrapped.
        return await run_db_activity(activity, arg)
