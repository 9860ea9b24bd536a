"""Starting a pull of the core service's metrics table on demand (``billing sync``)."""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio.common import WorkflowIDConflictPolicy

from billing.core.config import Settings
from billing.domain.ids import usage_sync_id
from billing.models.usage_sync import PullSyncInput, PullSyncResult
from billing.orchestration.temporal import connect
from workflows.usage_sync import PullUsageSyncWorkflow


async def run_pull_now(settings: Settings) -> PullSyncResult:
    """Run ``PullUsageSyncWorkflow`` now as ``usage-sync/pull-now-{UTC second}`` and wait for it.

    Two requests in the same second share one run; a pull running beside the hourly one is harmless
    (rows read twice diff to nothing, the watermark only moves forward).
    """
    client = await connect(settings)
    batch = f"pull-now-{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"
    return await client.execute_workflow(
        PullUsageSyncWorkflow.run,
        PullSyncInput(),
        id=usage_sync_id(batch),
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary="Pull counter rows from BILLING_METRICS_SOURCE_URL now (billing sync)",
    )
