"""The ``retention-daily`` schedule's workflow: purge what BILLING_RETENTION no longer keeps."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

from billing.models import PurgeInput, PurgeResult, RetentionInput
from billing.models.contracts import RetentionContract
from workflows.common import DB_RETRY

# Purge passes per run before continuing as new: keeps the history small however much is purged.
_PASSES_PER_RUN = 50


@workflow.defn
class RetentionWorkflow:
    """Calls the purge pass until nothing expired is left; each pass is many small transactions."""

    @workflow.run
    async def run(self, request: RetentionInput) -> PurgeResult:
        totals = request.totals
        for _ in range(_PASSES_PER_RUN):
            workflow.set_current_details(
                f"Purging: {totals.batches} batches, {totals.batch_rows} rows, "
                f"{totals.webhook_events} webhook events so far"
            )
            result = await workflow.execute_activity_method(
                RetentionContract.purge_expired,
                PurgeInput(chunk=request.chunk),
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=timedelta(minutes=2),
                retry_policy=DB_RETRY,
            )
            totals = PurgeResult(
                batch_rows=totals.batch_rows + result.batch_rows,
                batch_rejections=totals.batch_rejections + result.batch_rejections,
                batches=totals.batches + result.batches,
                webhook_events=totals.webhook_events + result.webhook_events,
            )
            if not result.more:
                workflow.set_current_details(
                    f"Done: purged {totals.batches} batches, {totals.batch_rows} rows, "
                    f"{totals.webhook_events} webhook events"
                )
                return totals
        workflow.continue_as_new(RetentionInput(chunk=request.chunk, totals=totals))
