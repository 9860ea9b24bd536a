"""Models of the Stripe reporting workflows (see workflows/stripe_report.py)."""

from __future__ import annotations

from pydantic import Field

from billing.domain.hours import HOUR_PATTERN
from billing.models import Model


class ReportTuning(Model):
    """How hard and how fast a report retries; production uses the defaults.

    It travels in the workflow input because workflows cannot read the worker's environment; tests
    shorten the intervals so a 429 storm or a killed worker is recovered from in seconds.
    """

    # Stripe asks for exponential backoff on 429; one second doubling to a minute is its advice.
    initial_interval_seconds: float = Field(default=1.0, gt=0)
    maximum_interval_seconds: float = Field(default=60.0, gt=0)
    # A worker that dies mid-page is noticed after this long without a heartbeat, and the page is
    # retried elsewhere; the activity heartbeats in the background every third of it.
    heartbeat_timeout_seconds: float = Field(default=30.0, gt=0)
    # Rows claimed per activity (one short claim transaction, then one record transaction per row).
    page_size: int = Field(default=100, ge=1, le=1000)
    # A claim's lease, renewed by every recorded outcome: rows of a worker that died are claimed again
    # (same identifier) once it expires. Well above one Stripe call's 20 s timeout.
    lease_seconds: float = Field(default=120.0, gt=0)


class StorageOverageInput(Model):
    """Queue the storage overage of one UTC hour (``YYYY-MM-DDTHH``); default: the hour the run starts."""

    hour: str | None = Field(default=None, pattern=HOUR_PATTERN)
    tuning: ReportTuning = ReportTuning()


class StorageOverageResult(Model):
    """What one storage-overage run did."""

    hour: str
    queued: int
    reports_started: int
    reports_already_running: int
    stripe_configured: bool


class QueueStorageOverageInput(Model):
    """Queue one ``storage_gb_hour`` row per paid org over its storage limit in ``hour``."""

    hour: str = Field(pattern=HOUR_PATTERN)


class QueueStorageOverageResult(Model):
    """How many rows were queued (0 when the hour had been queued already)."""

    hour: str
    queued: int


class StartPendingReportsInput(Model):
    """Start ``stripe-report/{org}/{hour}`` for one page of orgs with pending rows, after a cursor.

    ``source`` narrows it to the rows one producer queued (``sync:<batch id>``: what a usage sync
    calls for the orgs its batch queued overage for).
    """

    hour: str = Field(pattern=HOUR_PATTERN)
    source: str | None = None
    after_org_id: str | None = None
    page_size: int = Field(default=500, ge=1, le=5000)
    tuning: ReportTuning = ReportTuning()


class StartStripeReportsInput(Model):
    """Start (or signal, when running) the stripe-report workflows of these orgs for ``hour``: what
    org-billing calls once it has learned the org's Stripe customer, so that rows waiting for one go out."""

    org_ids: list[str] = Field(max_length=10_000)
    hour: str = Field(pattern=HOUR_PATTERN)
    tuning: ReportTuning = ReportTuning()


class StartReportsResult(Model):
    """Starts requested; ``last_org_id`` is the cursor of the next page (None when done)."""

    started: int
    already_running: int
    stripe_configured: bool = True
    last_org_id: str | None = None


class StripeReportInput(Model):
    """Send ``org_id``'s pending outbox rows to Stripe, oldest first.

    ``hour`` only names the run (the workflow ID); every pending row of the org is sent, whatever its
    hour, so a backlog drains in order. The counters carry progress across continue-as-new.
    """

    org_id: str
    hour: str = Field(pattern=HOUR_PATTERN)
    tuning: ReportTuning = ReportTuning()
    sent: int = 0
    deduplicated: int = 0
    failed: int = 0
    skipped: int = 0


class StripeReportResult(Model):
    """What a stripe-report workflow did; ``outcome`` is its last current-details line."""

    org_id: str
    hour: str
    sent: int
    deduplicated: int
    failed: int
    skipped: int
    pending: int
    stripe_configured: bool
    outcome: str
    uncertain: int = 0


class SendReportsInput(Model):
    """Claim, send and record one page of ``org_id``'s oldest rows."""

    org_id: str
    page_size: int = Field(default=100, ge=1, le=1000)
    lease_seconds: float = Field(default=120.0, gt=0)


class SendReportsResult(Model):
    """One page's outcome. ``more`` says pending rows remain; ``failures`` are Stripe's refusals;
    ``skip_reason`` is why pending rows wait (e.g. "waiting for a Stripe customer"); ``skipped`` is
    always 0 (no row is ever skipped any more; kept for recorded histories)."""

    sent: int = 0
    deduplicated: int = 0
    failed: int = 0
    skipped: int = 0
    pending: int = 0
    uncertain: int = 0
    more: bool = False
    stripe_configured: bool = True
    skip_reason: str | None = None
    failures: list[str] = Field(default_factory=list)
