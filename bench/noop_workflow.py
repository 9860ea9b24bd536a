"""The month-close benchmark's ceiling: a workflow that does nothing (no activity, no timer)."""

from __future__ import annotations

from temporalio import workflow


@workflow.defn
class NoopWorkflow:
    """Completes at its first workflow task."""

    @workflow.run
    async def run(self) -> None:
        """Nothing."""
