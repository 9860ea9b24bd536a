"""Activities of Stripe reporting: drain the outbox into meter events, queue storage overage, start reports.

Exactly-once, step by step (``send_stripe_reports``): claim, call, record.

1. **Claim** (one short transaction): take the org's advisory lock; rows first attempted longer than
   BILLING_REPORT_HORIZON ago and still unsettled become ``uncertain`` (never resent automatically:
   Stripe keeps an identifier for 24 hours only); if another attempt holds a live lease on a row of the
   org, claim nothing (one sender per org, oldest first) and retry later; an org without a Stripe
   customer keeps its rows ``pending`` "waiting for a Stripe customer"; otherwise mark the org's oldest
   rows ``sending`` with this attempt's id and a lease, and decide each row's timestamp (the timestamp
   rule, see sql/0008).
2. **Call** Stripe for each row, holding no transaction and no pool connection, with the row's fixed
   ``identifier`` and an ``Idempotency-Key`` of the row's current key generation.
3. **Record** each outcome in its own short transaction as soon as it is known (which also renews the
   lease of the attempt's other rows). A worker that dies leaves a lease that expires; the row is then
   claimed again, with the same identifier and a new key generation.

Outcomes: success or "an event already exists with identifier" -> ``sent``. A 5xx or no answer ->
``pending`` again with a new key generation (Stripe stores a 500 under its key and would replay it
forever). 429, 409, 401, 403 -> ``pending`` (not stored by Stripe, same key). A configuration refusal
(no such or inactive meter, unknown event name, customer mapping) -> ``pending`` with an alert-level
log and metric, new key generation. In these cases the attempt's other claimed rows are given back and
the activity raises, so Temporal backs off. Any other refusal is the row's own fault: ``failed`` with
Stripe's message; an operator may send it again (``billing report resend``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import stripe
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from billing.core.clock import utcnow
from billing.db.sql import query
from billing.domain.hours import parse_hour
from billing.domain.ids import canonical_uuid
from billing.models.contracts import StripeReportContract
from billing.models.stripe_report import (
    QueueStorageOverageInput,
    QueueStorageOverageResult,
    SendReportsInput,
    SendReportsResult,
    StartPendingReportsInput,
    StartReportsResult,
    StartStripeReportsInput,
)
from billing.observability import outbox_gauges
from billing.observability.telemetry import (
    STRIPE_CONFIG_REFUSALS,
    STRIPE_REPORT_FAILURES,
    STRIPE_REPORTS,
)
from billing.orchestration import temporal

# A claim is one short transaction; a session left idle inside one belonged to a vanished worker.
_IDLE_IN_TRANSACTION_TIMEOUT = "60s"
# Stripe's answer to a repeated identifier: the event was counted by an earlier attempt.
_ALREADY_EXISTS = "resource_already_exists"
# Statuses refused in front of Stripe's API (not stored under the key): retry later with the same key.
_RETRYABLE_STATUSES = frozenset({401, 403, 409, 429})
_WAITING_FOR_CUSTOMER = "waiting for a Stripe customer"


def idempotency_key(identifier: str, generation: int = 0) -> str:
    """The ``Idempotency-Key`` of a row's meter event: derived from its identifier and key generation.

    Generation 0 is the key earlier versions used; the generation moves on after a 5xx or no answer, so a
    result Stripe stored for one key (a 500 included) is never replayed at the row forever. Kept in
    step with ``report_idempotency_key`` in sql/0008.
    """
    return f"billing-meter-event:{identifier}" + (f":{generation}" if generation else "")


def identifier_of_key(key: str) -> str:
    """The row identifier inside an ``Idempotency-Key`` made by :func:`idempotency_key` (else ``key``)."""
    body = key.removeprefix("billing-meter-event:")
    head, _, tail = body.rpartition(":")
    return head if head and tail.isdigit() else body


def _is_configuration_refusal(error: stripe.StripeError) -> bool:
    """A refusal that is the Stripe account's configuration, not the row: no such or inactive meter, an
    unknown event name, or a meter whose customer or value mapping does not match the payload."""
    if error.http_status not in (400, 404):
        return False
    body = (error.json_body or {}).get("error", {}) if isinstance(error.json_body, dict) else {}
    param = str(body.get("param") or getattr(error, "param", None) or "")
    message = _error_message(error).lower()
    if param == "event_name" or "meter" in message:
        return True
    return param.startswith("payload[") and body.get("code") == "parameter_missing"


def _is_duplicate_identifier(error: stripe.StripeError) -> bool:
    """Stripe's refusal of a meter event whose identifier it already counted.

    Its documented answer is a 400 saying "An event already exists with identifier ..."; the error code
    is not documented, so the message is checked too.
    """
    message = str(error.user_message or error).lower()
    return error.code == _ALREADY_EXISTS or (
        error.http_status == 400 and "already exists" in message and "identifier" in message
    )


def _is_retryable(error: stripe.StripeError) -> bool:
    status = error.http_status
    return status is None or status >= 500 or status in _RETRYABLE_STATUSES


def _rotates_key(error: stripe.StripeError) -> bool:
    """Whether Stripe may have stored this answer under the key: a 5xx, no answer at all, or a refusal
    from inside the endpoint (a configuration refusal), so the next attempt must use a new key."""
    status = error.http_status
    return status is None or status >= 500 or status not in _RETRYABLE_STATUSES


def _error_code(error: stripe.StripeError) -> str:
    body = error.json_body if isinstance(error.json_body, dict) else {}
    return str(body.get("error", {}).get("code") or error.code or error.http_status or "no_answer")


def _error_message(error: stripe.StripeError) -> str:
    return error.user_message or str(error) or type(error).__name__


def _validate_org_id(org_id: str) -> str:
    try:
        return canonical_uuid(org_id)
    except ValueError:
        raise ApplicationError(f"org id must be a UUID, got {org_id!r}", non_retryable=True) from None


@contextlib.asynccontextmanager
async def _heartbeating() -> AsyncIterator[None]:
    """Heartbeat in the background while the block runs: waiting for the org's lock or a slow Stripe call
    is not a dead worker, but a killed worker stops heartbeating and its page is retried elsewhere."""
    timeout = activity.info().heartbeat_timeout
    every = timeout.total_seconds() / 3 if timeout else 10.0

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(every)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass(frozen=True)
class _Outcome:
    """One call's outcome: the row's new status (sent, failed, retry), why, Stripe's answer, whether the
    next attempt needs a new Idempotency-Key, and the error to raise for a retry."""

    status: str
    reason: str | None
    response: Any
    rotate: bool
    retry: stripe.StripeError | None


class StripeReportActivities(StripeReportContract):
    """Outbox drain and storage overage; ``stripe`` is None when STRIPE_API_KEY is not set."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        client: Client,
        task_queue: str,
        stripe_client: stripe.StripeClient | None,
        *,
        horizon: timedelta = timedelta(hours=20),
        grace: timedelta = timedelta(hours=1),
    ) -> None:
        self.pool = pool
        self.client = client
        self.task_queue = task_queue
        self.stripe = stripe_client
        self.horizon = horizon  # BILLING_REPORT_HORIZON
        self.grace = grace  # BILLING_STRIPE_FINALIZATION_GRACE

    @activity.defn
    async def send_stripe_reports(self, request: SendReportsInput) -> SendReportsResult:
        """Claim a short page of the org's oldest rows, call Stripe for each, record each outcome (see the
        module docstring). Raises a retryable error when Stripe must be retried later."""
        org_id = _validate_org_id(request.org_id)
        info = activity.info()
        # Every attempt of this activity settles rows under the same name, so the counts it returns
        # include rows an earlier attempt recorded before a 429 or a dropped connection.
        by = {
            "org_id": org_id,
            "reported_by": f"{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}",
        }
        rows: list[dict[str, Any]] = []
        if self.stripe is not None:
            rows = await self._send_page(self.stripe, org_id, request, by["reported_by"])
        async with self.pool.connection() as conn:
            counts = await (await conn.execute(query("report_counts_by"), by)).fetchone()
            failures = await (await conn.execute(query("report_failures_by"), by)).fetchall()
        assert counts is not None
        waiting = counts.pop("waiting_reason")
        return SendReportsResult(
            **counts,
            more=counts["pending"] > 0 and len(rows) == request.page_size,
            stripe_configured=self.stripe is not None,
            skip_reason=waiting,
            failures=[f"{f['identifier']}: {f['status_reason']}" for f in reversed(failures)],
        )

    async def _send_page(
        self, stripe_client: stripe.StripeClient, org_id: str, request: SendReportsInput, reported_by: str
    ) -> list[dict[str, Any]]:
        """Claim, then call and record row by row; returns the claimed rows, raises to retry later."""
        attempt_id = str(uuid.uuid4())
        lease = timedelta(seconds=request.lease_seconds)
        async with _heartbeating():
            rows = await self._claim(org_id, attempt_id, request.page_size, lease)
            retry_error: stripe.StripeError | None = None
            recording: asyncio.Task[None] | None = None
            recorded = 0  # rows whose outcome is recorded (or being recorded)
            in_flight: dict[str, Any] | None = None
            try:
                for row in rows:
                    activity.heartbeat(row["identifier"])
                    in_flight = row
                    outcome = await self._call(stripe_client, org_id, row)
                    in_flight = None
                    # Each outcome is recorded in its own short transaction as soon as it is known; the
                    # next call starts while it commits (records stay in order: one at a time).
                    if recording is not None:
                        await recording
                    recording = asyncio.create_task(
                        self._record(attempt_id, row, reported_by, lease, outcome)
                    )
                    recorded += 1
                    if outcome.retry is not None:
                        retry_error = outcome.retry
                        break
                if recording is not None:
                    await recording
            finally:
                if recording is not None and not recording.done():
                    await asyncio.shield(recording)
                if in_flight is not None:
                    # Interrupted mid-call (cancelled): no answer, so the next attempt uses a new key.
                    interrupted = _Outcome("retry", "will retry: call interrupted", None, True, None)
                    await asyncio.shield(self._record(attempt_id, in_flight, reported_by, lease, interrupted))
                    recorded += 1
                # Rows claimed but never called are given back now rather than when the lease expires.
                if recorded < len(rows):
                    async with self.pool.connection() as conn:
                        await conn.execute(query("report_release"), {"attempt_id": attempt_id})
        if retry_error is not None:
            raise retry_error
        return rows

    async def _claim(
        self, org_id: str, attempt_id: str, page_size: int, lease: timedelta
    ) -> list[dict[str, Any]]:
        """One short transaction: uncertain rows past the horizon, then the claim (see module doc)."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                query("report_lock_org"), {"org_id": org_id, "idle_timeout": _IDLE_IN_TRANSACTION_TIMEOUT}
            )
            uncertain = await (
                await conn.execute(
                    query("report_mark_uncertain"), {"org_id": org_id, "horizon": self.horizon}
                )
            ).fetchall()
            claimed = await (
                await conn.execute(
                    query("report_claim"),
                    {
                        "org_id": org_id,
                        "page_size": page_size,
                        "attempt_id": attempt_id,
                        "lease": lease,
                        "grace": self.grace,
                    },
                )
            ).fetchall()
        if uncertain:
            STRIPE_REPORTS.labels("uncertain").inc(len(uncertain))
            activity.logger.error(
                "org %s: %d Stripe reports not settled within %s of their first attempt are now uncertain "
                "and will not be resent automatically (first: %s); run `billing reconcile`",
                org_id,
                len(uncertain),
                self.horizon,
                uncertain[0]["identifier"],
            )
        if claimed and claimed[0]["busy"]:
            # Another report of this org holds a live lease: one sender per org, oldest first.
            raise ApplicationError(
                f"org {org_id}: another report is sending this org's rows; retrying after it",
                type="OrgReportBusy",
            )
        return [dict(row) for row in claimed]

    async def _call(self, stripe_client: stripe.StripeClient, org_id: str, row: dict[str, Any]) -> _Outcome:
        """Call Stripe for one row, holding no connection: its outcome, with the error to raise when
        Stripe must be retried later (the row is then pending again)."""
        try:
            status, reason, response = await self._send(stripe_client, org_id, row)
        except stripe.StripeError as error:
            reason = f"will retry: {error.http_status or 'no answer'} {_error_message(error)}"
            if _is_configuration_refusal(error):
                reason = f"will retry: Stripe configuration: {_error_message(error)}"
                STRIPE_CONFIG_REFUSALS.labels(_error_code(error)).inc()
                # Alert level: every row of every org waits until the Stripe account is fixed.
                activity.logger.error(
                    "ALERT: Stripe refused meter event %s (%s) for a configuration reason: %s; rows stay "
                    "pending and are retried",
                    row["identifier"],
                    row["stripe_event_name"],
                    _error_message(error),
                )
            return _Outcome("retry", reason, None, _rotates_key(error), error)
        return _Outcome(status, reason, response, False, None)

    async def _record(
        self, attempt_id: str, row: dict[str, Any], reported_by: str, lease: timedelta, outcome: _Outcome
    ) -> None:
        """Record one row's outcome in its own short transaction (renewing the attempt's lease)."""
        STRIPE_REPORTS.labels(outcome.status).inc()
        if outcome.status == "failed":
            code = (outcome.response or {}).get("error", {}).get("code") if outcome.response else None
            STRIPE_REPORT_FAILURES.labels(str(code or "other")).inc()
        async with self.pool.connection() as conn:
            # One statement is its own transaction: autocommit saves the COMMIT round trip per row.
            await conn.set_autocommit(True)
            try:
                await self._record_statement(conn, attempt_id, row, reported_by, lease, outcome)
            finally:
                await conn.set_autocommit(False)

    @staticmethod
    async def _record_statement(
        conn: Any, attempt_id: str, row: dict[str, Any], reported_by: str, lease: timedelta, outcome: _Outcome
    ) -> None:
        await conn.execute(
            query("report_record_one"),
            {
                "id": row["id"],
                "attempt_id": attempt_id,
                "outcome": outcome.status,
                "reason": outcome.reason,
                "response": None if outcome.response is None else Jsonb(outcome.response, dumps=_dumps),
                "rotate": outcome.rotate,
                "reported_by": reported_by,
                "lease": lease,
            },
        )

    async def _send(
        self, stripe_client: stripe.StripeClient, org_id: str, row: dict[str, Any]
    ) -> tuple[str, str | None, Any]:
        """One row as one meter event: (status, reason, Stripe's answer); raises a retryable error."""
        try:
            event = await stripe_client.v1.billing.meter_events.create_async(
                {
                    "event_name": row["stripe_event_name"],
                    "identifier": row["identifier"],
                    "timestamp": int(row["sent_timestamp"].timestamp()),
                    "payload": {
                        "stripe_customer_id": row["stripe_customer_id"],
                        "value": str(row["quantity"]),
                    },
                },
                {"idempotency_key": row["idempotency_key"]},
            )
        except stripe.StripeError as error:
            if _is_duplicate_identifier(error):
                # An earlier attempt (whose answer was lost, or whose record was) was counted.
                note = {"deduplicated": True, "error": error.json_body, "request_id": error.request_id}
                return "sent", "Stripe already had this identifier: counted once", note
            if _is_retryable(error) or _is_configuration_refusal(error):
                raise
            message = _error_message(error)
            activity.logger.warning(
                "org %s: Stripe refused report %s (%s %s): %s",
                org_id,
                row["identifier"],
                row["stripe_event_name"],
                row["quantity"],
                message,
            )
            return "failed", message, error.json_body or {"message": message}
        late = "sent late: stamped at send time" if row["sent_late"] else None
        return "sent", late, event.to_dict()

    @activity.defn
    async def queue_storage_overage(self, request: QueueStorageOverageInput) -> QueueStorageOverageResult:
        """Queue every missed storage hour up to ``request.hour`` per paid org over its storage limit, in
        one statement (see sql/queries/stripe_reports/queue_storage_overage.sql)."""
        hour = parse_hour(request.hour)
        # An hour ahead of the clock would bill storage not yet held, and Stripe refuses timestamps more
        # than five minutes ahead anyway.
        if hour > utcnow() + timedelta(minutes=5):
            raise ApplicationError(f"hour {request.hour} is in the future", non_retryable=True)
        async with self.pool.connection() as conn:
            cursor = await conn.execute(query("queue_storage_overage"), {"hour": hour})
            queued = cursor.rowcount
        return QueueStorageOverageResult(hour=request.hour, queued=max(queued, 0))

    @activity.defn
    async def start_pending_stripe_reports(self, request: StartPendingReportsInput) -> StartReportsResult:
        """Start the reports of one page of orgs with pending rows (the backlog trigger of the hourly job).

        Without STRIPE_API_KEY nothing is started: the rows wait, and ``billing status`` says why.
        """
        await outbox_gauges.refresh_outbox_gauges(self.pool)
        if self.stripe is None:
            return StartReportsResult(started=0, already_running=0, stripe_configured=False)
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                query("orgs_with_pending_reports"),
                {
                    "source": request.source,
                    "after_org_id": request.after_org_id,
                    "page_size": request.page_size,
                },
            )
            org_ids = [row["org_id"] for row in await cursor.fetchall()]
        starts = await temporal.start_stripe_reports(
            self.client, self.task_queue, org_ids, parse_hour(request.hour), tuning=request.tuning
        )
        return StartReportsResult(
            started=starts.started,
            already_running=starts.already_running,
            last_org_id=org_ids[-1] if len(org_ids) == request.page_size else None,
        )

    @activity.defn
    async def start_stripe_reports(self, request: StartStripeReportsInput) -> StartReportsResult:
        """Start (or signal) ``stripe-report/{org}/{hour}`` for the given orgs (org-billing calls it once it
        learned the org's Stripe customer). Repeating it is harmless."""
        org_ids = [_validate_org_id(org_id) for org_id in request.org_ids]
        starts = await temporal.start_stripe_reports(
            self.client, self.task_queue, org_ids, parse_hour(request.hour), tuning=request.tuning
        )
        return StartReportsResult(
            started=starts.started,
            already_running=starts.already_running,
            stripe_configured=self.stripe is not None,
        )


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)
