"""The ``monthly-close`` schedule's workflow: one ``monthly-reset`` per org with usage last month."""

from __future__ import annotations

from temporalio import workflow

from billing.domain.months import month_key
from billing.models import MonthlyCloseInput, MonthlyCloseResult, StartResetsInput
from billing.models.contracts import ResetContract
from workflows.common import run_db_activity

# Pages per run before continuing as new: keeps the history small for any number of orgs.
_PAGES_PER_RUN = 100


@workflow.defn
class MonthlyCloseWorkflow:
    """Walks the orgs page by page; starting an existing reset is a no-op, so a rerun is safe."""

    @workflow.run
    async def run(self, request: MonthlyCloseInput) -> MonthlyCloseResult:
        month = request.month or month_key(workflow.now())
        cursor = request.after_org_id
        started, already = request.started, request.already_started
        for _ in range(_PAGES_PER_RUN):
            workflow.set_current_details(f"Starting resets for {month}: {started} started, {already} existed")
            page = await run_db_activity(
                ResetContract.start_monthly_resets, StartResetsInput(month=month, after_org_id=cursor)
            )
            started += page.started
            already += page.already_started
            cursor = page.last_org_id
            if cursor is None:
                workflow.set_current_details(f"Done for {month}: {started} started, {already} existed")
                return MonthlyCloseResult(month=month, started=started, already_started=already)
        workflow.continue_as_new(
            MonthlyCloseInput(month=month, after_org_id=cursor, started=started, already_started=already)
        )
