"""``monthly-reset/{org_id}/{YYYY-MM}``: close an org's previous month, exactly once."""

from __future__ import annotations

from temporalio import workflow

from billing.domain.months import previous_month
from billing.models import MonthlyResetInput, MonthlyResetResult
from billing.models.contracts import ResetContract
from workflows.common import run_db_activity, run_db_activity_local_first


@workflow.defn
class MonthlyResetWorkflow:
    """Runs the one transaction that claims and closes the month; never half-applied.

    Its workflow ID is reused only after a run that did not complete (see
    billing.orchestration.temporal.start_monthly_reset), and the SQL claim makes a second run change nothing even
    after Temporal has forgotten the first. A month that has not begun is refused by the activity,
    non-retryably, so such a run fails at once with the reason.
    """

    @workflow.run
    async def run(self, request: MonthlyResetInput) -> MonthlyResetResult:
        closing = previous_month(request.month)
        workflow.set_current_details(f"Closing {closing} of org {request.org_id}")
        # Local first since issue 14 (a month close runs 10,000 of these); runs recorded before replay
        # the regular activity they ran.
        local_first = workflow.patched("close-month-local-first")
        run = run_db_activity_local_first if local_first else run_db_activity
        result = await run(ResetContract.close_org_month, request)
        if result.claimed:
            workflow.set_current_details(
                f"Closed {closing}: {result.tags_closed} meters recorded, {result.flags} quota flags now"
            )
        else:
            workflow.set_current_details(f"{request.month} had already been reset; nothing changed")
        return result
