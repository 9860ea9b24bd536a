"""``usage-sync/{batch}``: apply one staged batch of counter rows; and the hourly pull that feeds it.

Thin and deterministic: the rows are in PostgreSQL under the batch id, the activities do the work.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

from billing.domain.hours import hour_key
from billing.models.contracts import StripeReportContract, UsageContract
from billing.models.stripe_report import StartPendingReportsInput
from billing.models.usage_sync import (
    APPLY_PARTS,
    PARTIAL_BATCH_ERROR,
    AdvanceWatermarkInput,
    ApplyBatchInput,
    ApplyBatchResult,
    EnsureResetsInput,
    PullStageInput,
    PullSyncInput,
    PullSyncResult,
    ReadyBatchesInput,
    UsageSyncInput,
    UsageSyncResult,
)
from workflows.common import DB_RETRY, DB_TIMEOUT, run_db_activity

# The reset check waits for workflows; it heartbeats so a lost worker is noticed in this time.
_RESET_HEARTBEAT = timedelta(seconds=30)
# Reading the source and staging its rows may take a while on a first pull of a big table.
_PULL_TIMEOUT = timedelta(minutes=30)
# Patch marker: pulls recorded before it froze the watermark while any org was held back.
_WATERMARK_NEVER_FROZEN = "pull-watermark-never-frozen"
# Patch marker: syncs recorded before it applied a batch in one activity, not in parallel parts.
_APPLY_IN_PARTS = "usage-sync-apply-in-parts"
# Patch marker: syncs recorded before it checked the batch's monthly resets before every apply.
_APPLY_BEFORE_RESET_CHECK = "usage-sync-apply-before-reset-check"


async def sync_batch(batch_id: str, reset_wait_seconds: float) -> UsageSyncResult:
    """Apply the batch; where it needs months not opened yet, open them (monthly resets) and apply
    again what is still missing."""
    resets_started = 0
    if workflow.patched(_APPLY_BEFORE_RESET_CHECK):
        # Most batches need no reset: the apply itself finds the rows of months not opened yet and
        # holds them back, so the reset check (a pass over the whole batch) runs only when it did,
        # and only the parts that held something back are applied again.
        parts = await _apply_parts(batch_id, list(range(APPLY_PARTS)))
        held = [part for part, answer in enumerate(parts) if answer.orgs_skipped]
        if held:
            resets_started = await _ensure_resets(batch_id, reset_wait_seconds)
            for part, answer in zip(held, await _apply_parts(batch_id, held), strict=True):
                parts[part] = answer
        applied = ApplyBatchResult.of_parts(parts)
    else:
        resets_started = await _ensure_resets(batch_id, reset_wait_seconds)
        if workflow.patched(_APPLY_IN_PARTS):
            applied = ApplyBatchResult.of_parts(await _apply_parts(batch_id, list(range(APPLY_PARTS))))
        else:
            workflow.set_current_details(f"Batch {batch_id}: applying")
            applied = await run_db_activity(UsageContract.apply_usage_batch, ApplyBatchInput(batch_id=batch_id))
    result = UsageSyncResult(batch_id=batch_id, resets_started=resets_started, **dict(applied))
    if result.overage_reports:
        await _start_reports(batch_id)
    return result


async def _ensure_resets(batch_id: str, reset_wait_seconds: float) -> int:
    """Start and wait for the monthly resets the batch's rows need; how many were started."""
    workflow.set_current_details(f"Batch {batch_id}: checking monthly resets")
    resets = await workflow.execute_activity_method(
        UsageContract.ensure_batch_resets,
        EnsureResetsInput(batch_id=batch_id, wait_seconds=reset_wait_seconds),
        start_to_close_timeout=timedelta(seconds=reset_wait_seconds) + DB_TIMEOUT,
        heartbeat_timeout=_RESET_HEARTBEAT,
        retry_policy=DB_RETRY,
    )
    return resets.resets_started


async def _apply_parts(batch_id: str, parts: list[int]) -> list[ApplyBatchResult]:
    """Apply what of these parts of the batch can apply now, each part's answer in order.

    The parts share no row (sql/0017): their transactions run side by side. What an earlier apply of
    a part did is left alone, and its answer counts the whole batch's part so far.
    """
    workflow.set_current_details(f"Batch {batch_id}: applying")
    return list(
        await asyncio.gather(
            *(
                run_db_activity(
                    UsageContract.apply_usage_batch, ApplyBatchInput(batch_id=batch_id, part=part)
                )
                for part in parts
            )
        )
    )


async def _start_reports(batch_id: str) -> None:
    """Start ``stripe-report/{org}/{hour}`` for the orgs this batch queued overage for, page by page.

    Without STRIPE_API_KEY nothing starts and the rows wait as pending (the hourly job and
    ``billing report-pending`` send them once a key is set).
    """
    workflow.set_current_details(f"Batch {batch_id}: starting Stripe reports")
    cursor: str | None = None
    while True:
        page = await run_db_activity(
            StripeReportContract.start_pending_stripe_reports,
            StartPendingReportsInput(
                hour=hour_key(workflow.now()), source=f"sync:{batch_id}", after_org_id=cursor
            ),
        )
        cursor = page.last_org_id
        if cursor is None:
            return


def _summary(result: UsageSyncResult) -> str:
    return (
        f"{result.rows_applied} of {result.rows_received} rows changed usage, {result.rows_rejected} rejected,"
        f" {result.overage_reports} overage reports queued, {result.orgs_skipped} orgs skipped"
    )


@workflow.defn
class UsageSyncWorkflow:
    """One batch, exactly once: its ID is ``usage-sync/{batch}`` and a completed run is never rerun.

    When rows had to be held back (their org's month is not opened: its monthly reset did not
    complete), the run fails on purpose with the result as details: the batch is not done, and a
    retried push of it may run it again, which then applies only the months still missing.
    """

    @workflow.run
    async def run(self, request: UsageSyncInput) -> UsageSyncResult:
        result = await sync_batch(request.batch_id, request.reset_wait_seconds)
        workflow.set_current_details(_summary(result))
        if result.orgs_skipped:
            raise ApplicationError(
                f"{result.orgs_skipped} orgs skipped: their monthly reset did not complete; "
                "push the batch again (or wait for the next sync) to apply them",
                result,
                type=PARTIAL_BATCH_ERROR,
                non_retryable=True,
            )
        return result


@workflow.defn
class PullUsageSyncWorkflow:
    """Pull mode: stage the core service's rows changed since the watermark, apply, advance it.

    The watermark always moves forward. Rows held back for an org whose month is not opened yet stay
    staged under their batch; a later pull runs that batch again once the month is open (it then
    applies only those rows). Rows re-read diff to nothing.
    """

    @workflow.run
    async def run(self, request: PullSyncInput) -> PullSyncResult:
        workflow.set_current_details("Reading the metrics table")
        staged = await workflow.execute_activity_method(
            UsageContract.stage_pull_batch,
            PullStageInput(overlap_seconds=request.overlap_seconds),
            start_to_close_timeout=_PULL_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        if not staged.enabled:
            message = "pull mode is off: BILLING_METRICS_SOURCE_URL is not set"
            workflow.set_current_details(message)
            return PullSyncResult(enabled=False, message=message)
        assert staged.batch_id is not None and staged.window_to is not None
        sync = None
        if staged.rows_read:
            sync = await sync_batch(staged.batch_id, request.reset_wait_seconds)
        watermark = None
        reruns: list[UsageSyncResult] = []
        if workflow.patched(_WATERMARK_NEVER_FROZEN):
            # The watermark always moves: rows held back for one org stay staged under their batch,
            # which a later pull runs again once the org's month is open, so no org holds back others.
            advanced = await run_db_activity(
                UsageContract.advance_pull_watermark, AdvanceWatermarkInput(watermark=staged.window_to)
            )
            watermark = advanced.watermark
            ready = await run_db_activity(
                UsageContract.pull_batches_ready, ReadyBatchesInput(current=staged.batch_id)
            )
            for batch_id in ready.batch_ids:
                reruns.append(await sync_batch(batch_id, request.reset_wait_seconds))
        elif sync is None or not sync.orgs_skipped:
            advanced = await run_db_activity(
                UsageContract.advance_pull_watermark, AdvanceWatermarkInput(watermark=staged.window_to)
            )
            watermark = advanced.watermark
        message = f"read {staged.rows_read} rows" + (f"; {_summary(sync)}" if sync else "")
        if sync is not None and sync.orgs_skipped:
            message += (
                "; rows of months not yet opened are held back under their batch and applied by a later pull"
            )
        if reruns:
            message += f"; ran {len(reruns)} held-back batches again"
        if watermark is None:
            message += "; watermark kept so the skipped orgs' rows are read again"
        workflow.set_current_details(message)
        return PullSyncResult(
            enabled=True,
            message=message,
            batch_id=staged.batch_id,
            rows_read=staged.rows_read,
            watermark=watermark,
            sync=sync,
            reruns=reruns,
        )
