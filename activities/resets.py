"""Activities of the monthly reset: one transaction each, safe to run twice."""

from __future__ import annotations

import asyncio

import psycopg
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client

from billing.db.sql import query
from billing.domain.months import month_key, parse_month, previous_month
from billing.models import MonthlyResetInput, MonthlyResetResult, StartResetsInput, StartResetsResult
from billing.models.contracts import ResetContract
from billing.models.usage_sync import input_error
from billing.observability.metrics import MONTHLY_RESETS
from billing.orchestration.temporal import CONCURRENT_STARTS, start_monthly_reset


class ResetActivities(ResetContract):
    """Closes months in PostgreSQL and fans the monthly close out to one reset workflow per org."""

    def __init__(self, pool: AsyncConnectionPool, client: Client, task_queue: str) -> None:
        self.pool = pool
        self.client = client
        self.task_queue = task_queue

    @activity.defn
    async def close_org_month(self, request: MonthlyResetInput) -> MonthlyResetResult:
        """Claim and close one org's month in one transaction (see ``close_org_month`` in sql/).

        A retry after a commit whose answer was lost finds the claim taken and changes nothing. A month
        that has not begun by the database clock is refused, non-retryably.
        """
        try:
            month = parse_month(request.month)
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    query("close_org_month"), {"org_id": request.org_id, "month": month}
                )
                row = await cursor.fetchone()
        except (ValueError, psycopg.errors.DataError) as exc:
            MONTHLY_RESETS.labels("refused").inc()
            # A month that has not begun (SQLSTATE 22023) or a malformed one: no retry can fix it.
            raise input_error(
                f"monthly reset of org {request.org_id} for {request.month} refused: {exc}"
            ) from None
        assert row is not None
        MONTHLY_RESETS.labels("closed" if row["claimed"] else "already_done").inc()
        return MonthlyResetResult(
            org_id=request.org_id,
            month=request.month,
            closed_month=month_key(row["closed_month"]),
            claimed=row["claimed"],
            tags_closed=row["tags_closed"],
            flags=row["flags"],
        )

    @activity.defn
    async def start_monthly_resets(self, request: StartResetsInput) -> StartResetsResult:
        """Start the resets of one page of orgs that had usage in the month before ``request.month``."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                query("orgs_with_usage_in_month"),
                {
                    "month": parse_month(previous_month(request.month)),
                    "after_org_id": request.after_org_id,
                    "page_size": request.page_size,
                },
            )
            org_ids = [row["org_id"] for row in await cursor.fetchall()]

        gate = asyncio.Semaphore(CONCURRENT_STARTS)

        async def start(org_id: str) -> bool:
            async with gate:
                outcome = await start_monthly_reset(
                    self.client, self.task_queue, org_id, request.month, check_month=False, eager=True
                )
                return outcome.started

        started = await asyncio.gather(*(start(org_id) for org_id in org_ids))
        return StartResetsResult(
            started=sum(started),
            already_started=len(started) - sum(started),
            last_org_id=org_ids[-1] if len(org_ids) == request.page_size else None,
        )
