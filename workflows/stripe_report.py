"""``stripe-report/{org_id}/{YYYY-MM-DDTHH}`` and the ``storage-overage-hourly`` schedule's workflow.

Thin and deterministic: every read, write and Stripe call is an activity (activities/stripe_reports.py).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey

from billing.domain.hours import hour_key
from billing.models.contracts import StripeReportContract
from billing.models.stripe_report import (
    QueueStorageOverageInput,
    ReportTuning,
    SendReportsInput,
    StartPendingReportsInput,
    StorageOverageInput,
    StorageOverageResult,
    StripeReportInput,
    StripeReportResult,
)
from workflows.common import run_db_activity

# Pages per run before continuing as new: keeps the history small for any backlog.
_PAGES_PER_RUN = 200
# A page is at most page_size Stripe calls of at most 20 s each; heartbeats catch a dead worker far
# sooner, so this only bounds a page that is alive but stuck.
_PAGE_TIMEOUT = timedelta(hours=1)
_START_PAGES_PER_RUN = 100
_SCHEDULED_START = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")


def _send_retry(tuning: ReportTuning) -> RetryPolicy:
    """Temporal is the one retry layer for Stripe (the SDK's retries are off): back off, never give up,
    because a row left unsent is unbilled overage. Bad input is the only non-retryable error."""
    return RetryPolicy(
        initial_interval=timedelta(seconds=tuning.initial_interval_seconds),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=tuning.maximum_interval_seconds),
    )


@workflow.defn
class StripeReportWorkflow:
    """Drains one org's pending outbox rows into Stripe meter events, page by page, oldest first."""

    def __init__(self) -> None:
        self._rows_queued = False

    @workflow.signal
    def rows_queued(self) -> None:
        """A starter queued more rows while this run was going: drain again before completing."""
        self._rows_queued = True

    @workflow.run
    async def run(self, request: StripeReportInput) -> StripeReportResult:
        totals = {
            "sent": request.sent,
            "deduplicated": request.deduplicated,
            "failed": request.failed,
            "skipped": request.skipped,
        }
        last_failure: str | None = None
        for _ in range(_PAGES_PER_RUN):
            self._rows_queued = False
            page = await workflow.execute_activity_method(
                StripeReportContract.send_stripe_reports,
                SendReportsInput(
                    org_id=request.org_id,
                    page_size=request.tuning.page_size,
                    lease_seconds=request.tuning.lease_seconds,
                ),
                start_to_close_timeout=_PAGE_TIMEOUT,
                heartbeat_timeout=timedelta(seconds=request.tuning.heartbeat_timeout_seconds),
                retry_policy=_send_retry(request.tuning),
            )
            for key in totals:
                totals[key] += getattr(page, key)
            for failure in page.failures:
                workflow.logger.warning("org %s: Stripe refused %s", request.org_id, failure)
                last_failure = failure
            if not page.stripe_configured:
                outcome = (
                    f"STRIPE_API_KEY is not set: {page.pending} reports stay pending (none lost); "
                    "they are sent in order by the first run after a key is set"
                )
                return self._finish(request, totals, page.pending, False, outcome)
            details = (
                f"{totals['sent']} sent ({totals['deduplicated']} already in Stripe), "
                f"{totals['failed']} failed, {page.pending} pending"
            )
            if page.uncertain:
                details += f", {page.uncertain} uncertain (past the horizon: run billing reconcile)"
            if page.skip_reason:
                details += f"; pending rows are {page.skip_reason}"
            if last_failure:
                details += f"; last refusal: {last_failure}"
            workflow.set_current_details(details)
            if not page.more and not self._rows_queued:
                return self._finish(request, totals, page.pending, True, details, page.uncertain)
        workflow.continue_as_new(request.model_copy(update=totals))

    @staticmethod
    def _finish(
        request: StripeReportInput,
        totals: dict[str, int],
        pending: int,
        configured: bool,
        outcome: str,
        uncertain: int = 0,
    ) -> StripeReportResult:
        workflow.set_current_details(outcome)
        return StripeReportResult(
            org_id=request.org_id,
            hour=request.hour,
            pending=pending,
            stripe_configured=configured,
            outcome=outcome,
            uncertain=uncertain,
            **totals,
        )


@workflow.defn
class StorageOverageWorkflow:
    """Queues the storage overage of the scheduled hour and of every hour missed before it (up to 35
    days), then starts the reports of every org with pending rows.

    Starting reports for every org with pending rows (not only those just queued) is also what sends a
    backlog once STRIPE_API_KEY is set, or after a report gave up on a broken run: within the hour.
    """

    @workflow.run
    async def run(self, request: StorageOverageInput) -> StorageOverageResult:
        # The hour the run was *scheduled* for (Temporal sets TemporalScheduledStartTime on a schedule's
        # runs), not when it started: a run delayed by an outage still covers its own hour, and the
        # catch-up in queue_storage_overage covers the hours whose runs were skipped.
        scheduled = workflow.info().typed_search_attributes.get(_SCHEDULED_START)
        hour = request.hour or hour_key(scheduled or workflow.now())
        workflow.set_current_details(f"Queueing storage overage of {hour}")
        queued = await run_db_activity(
            StripeReportContract.queue_storage_overage, QueueStorageOverageInput(hour=hour)
        )
        started = already = 0
        configured = True
        cursor: str | None = None
        for _ in range(_START_PAGES_PER_RUN):
            page = await run_db_activity(
                StripeReportContract.start_pending_stripe_reports,
                StartPendingReportsInput(hour=hour, after_org_id=cursor, tuning=request.tuning),
            )
            started += page.started
            already += page.already_running
            configured = page.stripe_configured
            cursor = page.last_org_id
            if cursor is None:
                break
        # Past the page limit the rest of the orgs wait for the next hour; their rows stay pending.
        reporting = "" if configured else "; STRIPE_API_KEY is not set, so no reports were started"
        workflow.set_current_details(
            f"{hour}: {queued.queued} storage reports queued; reports started for {started} orgs, "
            f"{already} already running{reporting}"
        )
        return StorageOverageResult(
            hour=hour,
            queued=queued.queued,
            reports_started=started,
            reports_already_running=already,
            stripe_configured=configured,
        )
