"""Models of the usage-sync workflows (see workflows/usage_sync.py).

Rows never travel in these: a batch is staged in PostgreSQL and named by its ``batch_id``.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field
from temporalio.exceptions import ApplicationError

from billing.models import Model

# A workflow result lists at most this many skipped orgs; the full list stays in usage_batch_skips.
MAX_LISTED_SKIPS = 100
# The workflow of a batch that left orgs out fails with this error type and its result as details, so
# a retried push of the same batch may run it again (see billing.orchestration.temporal.run_usage_sync).
PARTIAL_BATCH_ERROR = "UsageBatchPartiallyApplied"
# An activity whose input can never work (a month that has not begun, a value out of range) fails with
# this non-retryable error type and the reason, instead of being retried forever.
INPUT_ERROR = "InvalidInput"


def input_error(reason: str) -> ApplicationError:
    """The non-retryable failure of an activity whose input is wrong; ``reason`` says why."""
    return ApplicationError(reason, type=INPUT_ERROR, non_retryable=True)


class PullSyncInput(Model):
    """Run one pull of the core service's metrics table (the hourly schedule's argument).

    ``overlap_seconds``: how far before the stored watermark to read again, so rows whose update
    committed late in the source (after an earlier read) are still seen; re-reading a row is harmless.
    """

    overlap_seconds: int = Field(default=600, ge=0, le=86_400)
    reset_wait_seconds: float = Field(default=60.0, gt=0, le=3_600)


class UsageSyncInput(Model):
    """Apply the staged batch ``batch_id``; wait at most ``reset_wait_seconds`` for monthly resets."""

    batch_id: str = Field(min_length=1, max_length=200)
    reset_wait_seconds: float = Field(default=60.0, gt=0, le=3_600)


class SkippedOrg(Model):
    """An org whose rows of ``month`` (and later) a batch held back: the month is not opened for it yet."""

    org_id: str
    month: str
    reason: str


class EnsureResetsInput(Model):
    """Make sure every month a batch needs is opened for its orgs, waiting at most ``wait_seconds``."""

    batch_id: str
    wait_seconds: float


class EnsureResetsResult(Model):
    """How many monthly resets the batch needed and started; how many orgs are skipped for it."""

    resets_needed: int
    resets_started: int
    orgs_skipped: int


# The parts a batch is applied in, in parallel transactions (sql/0017: usage_batch_part() splits the
# orgs in two; a part's rows share no row lock with the other part's).
APPLY_PARTS = 2


class ApplyBatchInput(Model):
    """Apply the staged batch ``batch_id`` in one transaction: all of it, or one ``part`` of it
    (``0`` to ``APPLY_PARTS - 1``: the orgs of that part)."""

    batch_id: str
    part: int | None = None


class ApplyBatchResult(Model):
    """What the batch did so far, read back from PostgreSQL (the same on any retry).

    ``rows_applied``: rows that changed usage; ``rows_pending``: valid rows held back (months not yet
    opened for their org); ``orgs_skipped``: orgs with rows held back.
    """

    rows_received: int
    rows_applied: int
    rows_rejected: int
    rows_pending: int
    overage_reports: int
    orgs_applied: int
    orgs_skipped: int
    skipped_orgs: list[SkippedOrg] = []

    @classmethod
    def of_parts(cls, parts: list[ApplyBatchResult]) -> ApplyBatchResult:
        """The batch's answer from its parts' answers: each part counts only its own orgs (and the
        first part the rows of no org), so the counts add up; the listed skips are merged."""
        skipped = {skip.org_id: skip for part in parts for skip in part.skipped_orgs}
        return cls(
            rows_received=parts[0].rows_received,
            rows_applied=sum(part.rows_applied for part in parts),
            rows_rejected=sum(part.rows_rejected for part in parts),
            rows_pending=sum(part.rows_pending for part in parts),
            overage_reports=sum(part.overage_reports for part in parts),
            orgs_applied=sum(part.orgs_applied for part in parts),
            orgs_skipped=sum(part.orgs_skipped for part in parts),
            skipped_orgs=[skipped[org] for org in sorted(skipped)][:MAX_LISTED_SKIPS],
        )


class UsageSyncResult(ApplyBatchResult):
    """The result of ``usage-sync/{batch}``."""

    batch_id: str
    resets_started: int = 0


class PullStageInput(Model):
    """Stage the source rows changed since the watermark (minus ``overlap_seconds``)."""

    overlap_seconds: int


class PullStageResult(Model):
    """A staged pull window. ``enabled`` is false when BILLING_METRICS_SOURCE_URL is not set."""

    enabled: bool
    batch_id: str | None = None
    rows_read: int = 0
    window_from: datetime | None = None
    window_to: datetime | None = None


class AdvanceWatermarkInput(Model):
    """Move the pull watermark forward to ``watermark`` (never backwards)."""

    watermark: datetime


class AdvanceWatermarkResult(Model):
    """The stored watermark after the advance."""

    watermark: datetime


class PullSyncResult(Model):
    """The result of a pull: what it read and what the sync of those rows did."""

    enabled: bool
    message: str
    batch_id: str | None = None
    rows_read: int = 0
    watermark: datetime | None = None
    sync: UsageSyncResult | None = None
    reruns: list[UsageSyncResult] = []


class ReadyBatchesInput(Model):
    """Find up to ``limit`` held-back pull batches (other than ``current``) that can apply more now."""

    current: str
    limit: int = Field(default=20, ge=1, le=1_000)


class ReadyBatchesResult(Model):
    """Pull batches to run again, oldest first."""

    batch_ids: list[str] = []
