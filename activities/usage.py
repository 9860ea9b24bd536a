"""Activities of the usage sync: open the months a batch needs, apply it, pull from the core service.

Each one is idempotent: the reset check re-derives its verdict, the apply skips orgs already applied
for the batch (usage_batch_orgs) and reads its result back from PostgreSQL, a pull re-read of rows
already applied diffs to nothing.
"""

from __future__ import annotations

import asyncio
from datetime import date, datetime, timedelta

import psycopg
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from billing.adapters.notification_delivery import Dispatcher
from billing.core.config import Settings
from billing.core.errors import ConfigError
from billing.db.sql import query
from billing.domain.months import parse_month
from billing.models.contracts import UsageContract
from billing.models.usage_sync import (
    MAX_LISTED_SKIPS,
    AdvanceWatermarkInput,
    AdvanceWatermarkResult,
    ApplyBatchInput,
    ApplyBatchResult,
    EnsureResetsInput,
    EnsureResetsResult,
    PullStageInput,
    PullStageResult,
    ReadyBatchesInput,
    ReadyBatchesResult,
    SkippedOrg,
    input_error,
)
from billing.observability.metrics import USAGE_APPLY_ROWS
from billing.orchestration.temporal import CONCURRENT_STARTS, start_monthly_reset

_HEARTBEAT_EVERY = 2.0
# The apply's locks are taken in one fixed order, so these should never happen; if one does, the
# transaction is simply run again (Temporal would retry the activity anyway).
_APPLY_ATTEMPTS = 3
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
# The pull watermark's key in sync_watermarks.
PULL_SOURCE = "metrics"
_FAILED = {
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TERMINATED: "was terminated",
    WorkflowExecutionStatus.CANCELED: "was cancelled",
    WorkflowExecutionStatus.TIMED_OUT: "timed out",
}


def _month_of(month: str) -> date:
    """The first day of ``month``; a month SQL should never produce is an input error, not a retry."""
    try:
        return parse_month(month)
    except ValueError as exc:
        raise input_error(str(exc)) from None


class UsageActivities(UsageContract):
    """The side effects of ``usage-sync/{batch}`` and of pull mode."""

    def __init__(
        self, settings: Settings, pool: AsyncConnectionPool, client: Client, task_queue: str
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.client = client
        self.task_queue = task_queue

    async def _settle_reset(self, org_id: str, month: str) -> tuple[bool, str | None]:
        """Start (or find) ``monthly-reset/{org}/{month}`` and wait for it: (started now, failure)."""
        outcome = await start_monthly_reset(self.client, self.task_queue, org_id, month, check_month=False)
        if outcome.status in _FAILED:
            return outcome.started, f"{outcome.workflow_id} {_FAILED[outcome.status]}"
        if outcome.status == WorkflowExecutionStatus.COMPLETED:
            return outcome.started, None
        try:
            await self.client.get_workflow_handle(outcome.workflow_id).result()
        except WorkflowFailureError as exc:
            cause = exc.cause.message if exc.cause is not None and hasattr(exc.cause, "message") else exc
            return outcome.started, f"{outcome.workflow_id} did not complete: {cause}"
        return outcome.started, None

    @activity.defn
    async def ensure_batch_resets(self, request: EnsureResetsInput) -> EnsureResetsResult:
        """Make sure each (org, month) the batch needs is opened by its monthly reset.

        Starts the missing ``monthly-reset/{org}/{month}`` workflows and waits for them (heartbeating)
        at most ``wait_seconds``. Orgs whose reset failed, was terminated or did not finish in time are
        recorded as skipped for the batch, replacing the previous check's verdict.
        """
        params = {"batch_id": request.batch_id}
        async with self.pool.connection() as conn:
            needed = await (await conn.execute(query("batch_resets_needed"), params)).fetchall()

        gate = asyncio.Semaphore(CONCURRENT_STARTS)

        async def settle(org_id: str, month: str) -> tuple[bool, str | None]:
            async with gate:
                return await self._settle_reset(org_id, month)

        tasks = {
            (row["org_id"], row["month"]): asyncio.create_task(settle(row["org_id"], row["month"]))
            for row in needed
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.wait_seconds
        pending = set(tasks.values())
        while pending and loop.time() < deadline:
            activity.heartbeat(f"{len(pending)} of {len(tasks)} monthly resets still running")
            _, pending = await asyncio.wait(
                pending, timeout=min(_HEARTBEAT_EVERY, max(deadline - loop.time(), 0.0))
            )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

        skips: dict[str, tuple[str, str]] = {}
        started = 0
        for (org_id, month), task in tasks.items():
            if task.cancelled():
                reason = f"monthly-reset/{org_id}/{month} did not complete within {request.wait_seconds:g} s"
            elif task.exception() is not None:
                reason = f"monthly-reset/{org_id}/{month} could not be started: {task.exception()}"
            else:
                was_started, reason = task.result()
                started += was_started
            if reason is not None and org_id not in skips:
                skips[org_id] = (month, reason)

        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(query("clear_batch_skips"), params)
            if skips:
                org_ids = sorted(skips)
                await conn.execute(
                    query("record_batch_skips"),
                    {
                        **params,
                        "org_ids": org_ids,
                        "months": [_month_of(skips[org][0]) for org in org_ids],
                        "reasons": [skips[org][1] for org in org_ids],
                    },
                )
        return EnsureResetsResult(resets_needed=len(tasks), resets_started=started, orgs_skipped=len(skips))

    @activity.defn
    async def apply_usage_batch(self, request: ApplyBatchInput) -> ApplyBatchResult:
        """Apply the staged batch, or one part of it, in one transaction (``apply_usage_batch`` in
        sql/0017); the answer counts what that part covers."""
        params = {"batch_id": request.batch_id, "part": request.part}
        apply = query("apply_usage_batch" if request.part is None else "apply_usage_batch_part")
        for attempt in range(1, _APPLY_ATTEMPTS + 1):
            try:
                async with self.pool.connection() as conn:
                    async with conn.transaction():
                        before = await (await conn.execute(query("apply_counts_so_far"), params)).fetchone()
                        row = await (await conn.execute(apply, params)).fetchone()
                        # Thresholds reached, in the same transaction: exactly once per crossing.
                        notified = await (
                            await conn.execute(query("notify_usage_thresholds"), params)
                        ).fetchall()
                    skipped = await (
                        await conn.execute(query("batch_skips"), {**params, "limit": MAX_LISTED_SKIPS})
                    ).fetchall()
                break
            except _RETRYABLE:
                if attempt == _APPLY_ATTEMPTS:
                    raise
                activity.logger.warning("apply of batch %s retried after a lock conflict", request.batch_id)
            except psycopg.errors.DataError as exc:
                # A value the database cannot take (out of range, malformed): retrying cannot help.
                raise input_error(f"batch {request.batch_id} cannot be applied: {exc}") from None
        assert row is not None and before is not None
        # The answer carries the batch's (or part's) running totals; the metric counts this run's.
        USAGE_APPLY_ROWS.labels("applied").inc(row["rows_applied"] - before["rows_applied"])
        USAGE_APPLY_ROWS.labels("rejected").inc(row["rows_rejected"] - before["rows_rejected"])
        USAGE_APPLY_ROWS.labels("held_back").inc(row["rows_pending"])
        if notified:
            await self._dispatch([n["id"] for n in notified])
        return ApplyBatchResult(**row, skipped_orgs=[SkippedOrg(**skip) for skip in skipped])

    async def _dispatch(self, ids: list[int]) -> None:
        """Start the new notifications' deliveries now; if that fails, the minutely
        ``notifications-dispatch`` schedule does (the rows are committed), so the apply still succeeds."""
        try:
            await Dispatcher(self.settings, self.pool, self.client, self.task_queue).dispatch(ids)
        except Exception as exc:
            activity.logger.warning("notifications %s left to the dispatch schedule: %s", ids, exc)

    @activity.defn
    async def stage_pull_batch(self, request: PullStageInput) -> PullStageResult:
        """Copy the source rows changed since the watermark into a staged batch, in one transaction.

        The window is (watermark - overlap, the source's clock now]; its bounds name the batch. Rows
        stream from the source's COPY straight into ours and never leave the activity.
        """
        url = self.settings.metrics_source_url
        if not url:
            return PullStageResult(enabled=False)
        async with self.pool.connection() as conn:
            row = await (await conn.execute(query("watermark_get"), {"source": PULL_SOURCE})).fetchone()
        watermark: datetime | None = row["watermark"] if row else None
        window_from = watermark - timedelta(seconds=request.overlap_seconds) if watermark else None
        try:
            source = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise ConfigError(
                "BILLING_METRICS_SOURCE_URL", f"the metrics source does not answer ({exc})"
            ) from None
        async with source:
            await source.execute(query("source_session"))
            now_row = await (await source.execute(query("source_now"))).fetchone()
            assert now_row is not None
            window_to: datetime = now_row[0]
            start = "start" if window_from is None else f"{window_from:%Y%m%dT%H%M%S.%fZ}"
            batch_id = f"pull-{start}-{window_to:%Y%m%dT%H%M%S.%fZ}"
            copy_params = {
                "batch_id": batch_id,
                "window_from": window_from.isoformat() if window_from else "-infinity",
                "window_to": window_to.isoformat(),
            }
            async with self.pool.connection() as conn, conn.transaction():
                claim = await conn.execute(
                    query("stage_batch_claim"), {"batch_id": batch_id, "source": "pull", "rows_received": 0}
                )
                if await claim.fetchone() is not None:
                    async with (
                        source.cursor().copy(query("source_metrics_copy"), copy_params) as outgoing,
                        conn.cursor().copy(query("stage_pulled_rows")) as incoming,
                    ):
                        async for data in outgoing:
                            await incoming.write(data)
                counted = await (
                    await conn.execute(query("stage_pull_count"), {"batch_id": batch_id})
                ).fetchone()
        assert counted is not None
        return PullStageResult(
            enabled=True,
            batch_id=batch_id,
            rows_read=counted["rows_received"],
            window_from=window_from,
            window_to=window_to,
        )

    @activity.defn
    async def pull_batches_ready(self, request: ReadyBatchesInput) -> ReadyBatchesResult:
        """Held-back pull batches whose orgs' months have been opened since (see pull_batches_ready.sql)."""
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    query("pull_batches_ready"), {"current": request.current, "limit": request.limit}
                )
            ).fetchall()
        return ReadyBatchesResult(batch_ids=[row["batch_id"] for row in rows])

    @activity.defn
    async def advance_pull_watermark(self, request: AdvanceWatermarkInput) -> AdvanceWatermarkResult:
        """Move the pull watermark forward (an older value than the stored one changes nothing)."""
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    query("watermark_advance"), {"source": PULL_SOURCE, "watermark": request.watermark}
                )
            ).fetchone()
        assert row is not None
        return AdvanceWatermarkResult(watermark=row["watermark"])
