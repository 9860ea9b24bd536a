"""The retention purge: staged batches and processed webhook events older than BILLING_RETENTION.

Deliberately many small transactions rather than one: each DELETE removes at most ``chunk`` rows and
commits, so a purge of millions of rows never holds locks or bloats a transaction, and an interrupted
purge simply continues where it stopped (deleting what is already gone is a no-op, so retries are safe).
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from temporalio import activity

from billing.core.config import Settings
from billing.db.sql import query
from billing.models import PurgeInput, PurgeResult
from billing.models.contracts import RetentionContract

# Children first, the batch row last: until its last row is gone a batch id still deduplicates.
_STEPS = (
    ("batch_rows", "retention_purge_batch_rows"),
    ("batch_rejections", "retention_purge_batch_rejections"),
    ("batches", "retention_purge_batches"),
    ("webhook_events", "retention_purge_webhook_events"),
)


class RetentionActivities(RetentionContract):
    """Purges what BILLING_RETENTION no longer keeps."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool) -> None:
        self.settings = settings
        self.pool = pool

    @activity.defn
    async def purge_expired(self, request: PurgeInput) -> PurgeResult:
        """Run bounded DELETEs (one transaction each) until nothing expired is left or the pass's
        ``max_chunks`` are used; ``more`` says whether another pass is needed."""
        return await purge_expired(self.pool, self.settings.retention.total_seconds(), request)


async def purge_expired(
    pool: AsyncConnectionPool, retention_seconds: float, request: PurgeInput
) -> PurgeResult:
    """The purge itself, shared by the activity and the tests."""
    counts = dict.fromkeys([name for name, _ in _STEPS], 0)
    chunks = 0
    params = {"retention_seconds": retention_seconds, "chunk": request.chunk}
    for name, statement in _STEPS:
        while True:
            if chunks >= request.max_chunks:
                return PurgeResult(**counts, more=True)
            async with pool.connection() as conn, conn.transaction():
                row = await (await conn.execute(query(statement), params)).fetchone()
            assert row is not None
            chunks += 1
            counts[name] += row["deleted"]
            if activity.in_activity():
                activity.heartbeat(chunks)
            if row["deleted"] < request.chunk:
                break
    return PurgeResult(**counts, more=False)
