"""A test-only switch that slows every activity down: ``BILLING_TEST_ACTIVITY_DELAY=0.3 make test``.

Every activity of this project is a database transaction (some around a Stripe call), so a delay
before each one moves every commit later than a test that raced the product would expect. A suite
that stays green with the delay waits for what the product guarantees, not for how fast it usually is.
The switch lives in the tests package; production code only offers the hook (``build_worker``'s
``interceptors``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

ENV = "BILLING_TEST_ACTIVITY_DELAY"


def activity_delay() -> float:
    """Seconds of delay asked for by ``BILLING_TEST_ACTIVITY_DELAY`` (0 when unset)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a number of seconds, got {raw!r}") from None
    if seconds < 0:
        raise ValueError(f"{ENV} must not be negative, got {raw!r}")
    return seconds


class ActivityDelay(Interceptor):
    """Sleep ``seconds`` before every activity attempt runs (the attempt's timeouts already run)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        seconds = self.seconds

        class Delayed(ActivityInboundInterceptor):
            async def execute_activity(self, input: ExecuteActivityInput) -> Any:
                await asyncio.sleep(seconds)
                return await super().execute_activity(input)

        return Delayed(next)


def delay_interceptors() -> list[Interceptor]:
    """The worker interceptors the environment asks for: the delay when set, else none."""
    seconds = activity_delay()
    return [ActivityDelay(seconds)] if seconds > 0 else []

