"""Activities of Stripe reporting: drain the outbox into meter events, queue storage overage, start reports.

Exactly-once, step by step (``send_stripe_reports``), all in ONE PostgreSQL transaction:

1. take the org's advisory lock (a second report of the same org waits here), so a row is never sent by
   two workflows at once and rows go out oldest first;
2. lock the org's oldest pending rows (``FOR NO KEY UPDATE``);
3. send each as one meter event carrying the row's deterministic ``identifier`` and an
   ``Idempotency-Key`` derived from it;
4. record every outcome and commit.

If the worker dies between a Stripe call and the commit, the transaction rolls back and the rows are
pending again; the retry sends them with the same identifier and key, and Stripe either replays its first
answer (same key) or answers "an event already exists with identifier ..." (counted as sent). Either way
Stripe counted the row once.

Retryable Stripe errors (429, 5xx, 409, timeouts, dropped connections, and 401/403, which are a key
problem, not a row problem) first commit the rows already sent in the page, then raise, so Temporal's
retry policy backs off and resumes at the row that failed. Any other 4xx marks that row ``failed`` with
Stripe's message and the page goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from billing import reporting
from billing.hours import parse_hour
from billing.models_stripe import (
    QueueStorageOverageInput,
    QueueStorageOverageResult,
    SendReportsInput,
    SendReportsResult,
    StartPendingReportsInput,
    StartReportsResult,
    StartStripeReportsInput,
)
from billing.sql import query
from billing.telemetry import STRIPE_REPORTS

# A session left idle in its transaction this long belonged to a worker that vanished without its TCP
# connection closing; ending it releases the org's lock. Far above one Stripe call's timeout.
_IDLE_IN_TRANSACTION_TIMEOUT = "120s"
# Stripe's answer to a repeated identifier: the event was counted by an earlier attempt.
_ALREADY_EXISTS = "resource_already_exists"
# Statuses that are not the row's fault: retry the call later, the row stays pending.
_RETRYABLE_STATUSES = frozenset({401, 403, 409, 429})


def idempotency_key(identifier: str) -> str:
    """The ``Idempotency-Key`` of a row's meter event: derived from its identifier, so every retry of the
    same row (Temporal's, an operator's, a second worker's) carries the same key."""
    return f"billing-meter-event:{identifier}"


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


def _error_message(error: stripe.StripeError) -> str:
    return error.user_message or str(error) or type(error).__name__


def _validate_org_id(org_id: str) -> str:
    try:
        return str(uuid.UUID(org_id))
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


class StripeReportActivities:
    """Outbox drain and storage overage; ``stripe`` is None when STRIPE_API_KEY is not set."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        client: Client,
        task_queue: str,
        stripe_client: stripe.StripeClient | None,
    ) -> None:
        self.pool = pool
        self.client = client
        self.task_queue = task_queue
        self.stripe = stripe_client

    @activity.defn(name="send_stripe_reports")
    async def send_stripe_reports(self, request: SendReportsInput) -> SendReportsResult:
        """Send one page of the org's pending rows, oldest first, in one transaction (see module doc)."""
        org_id = _validate_org_id(request.org_id)
        info = activity.info()
        # Every attempt of this activity settles rows under the same name, so the counts it returns
        # include rows an earlier attempt committed before a 429 or a dropped connection.
        by = {
            "org_id": org_id,
            "reported_by": f"{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}",
        }
        retry_error: stripe.StripeError | None = None
        rows: list[dict[str, Any]] = []
        async with _heartbeating(), self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                query("report_lock_org"), {"org_id": org_id, "idle_timeout": _IDLE_IN_TRANSACTION_TIMEOUT}
            )
            skipped = await (await conn.execute(query("report_skip_ineligible"), by)).fetchall()
            if skipped:
                activity.logger.info(
                    "org %s: %d reports skipped (%s)", org_id, len(skipped), skipped[0]["status_reason"]
                )
            if self.stripe is not None:
                page = {"org_id": org_id, "page_size": request.page_size}
                rows = list(await (await conn.execute(query("report_claim_page"), page)).fetchall())
                outcomes: list[tuple[int, str, str | None, Any]] = []
                for row in rows:
                    try:
                        outcomes.append((row["id"], *await self._send(self.stripe, org_id, row)))
                    except stripe.StripeError as error:
                        # Keep the row pending, remember why, commit the rows settled before it, then
                        # raise so Temporal backs off and resumes at this row.
                        retry_error = error
                        reason = f"will retry: {error.http_status or 'no answer'} {_error_message(error)}"
                        outcomes.append((row["id"], "pending", reason, None))
                        break
                for _, status, _, _ in outcomes:
                    STRIPE_REPORTS.labels("retry" if status == "pending" else status).inc()
                await conn.execute(
                    query("report_record"),
                    {
                        **by,
                        "ids": [o[0] for o in outcomes],
                        "statuses": [o[1] for o in outcomes],
                        "reasons": [o[2] for o in outcomes],
                        "responses": [None if o[3] is None else Jsonb(o[3], dumps=_dumps) for o in outcomes],
                    },
                )
            counts = await (await conn.execute(query("report_counts_by"), by)).fetchone()
            failures = await (await conn.execute(query("report_failures_by"), by)).fetchall()
            skip_reason = await (await conn.execute(query("report_skip_reason_by"), by)).fetchone()
        if retry_error is not None:
            raise retry_error
        assert counts is not None
        return SendReportsResult(
            **counts,
            more=counts["pending"] > 0 and len(rows) == request.page_size,
            stripe_configured=self.stripe is not None,
            skip_reason=skip_reason["status_reason"] if skip_reason else None,
            failures=[f"{f['identifier']}: {f['status_reason']}" for f in reversed(failures)],
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
                    "timestamp": int(row["event_timestamp"].timestamp()),
                    "payload": {
                        "stripe_customer_id": row["stripe_customer_id"],
                        "value": str(row["quantity"]),
                    },
                },
                {"idempotency_key": idempotency_key(row["identifier"])},
            )
        except stripe.StripeError as error:
            if _is_duplicate_identifier(error):
                # An earlier attempt (whose answer was lost, or whose commit was) was counted.
                note = {"deduplicated": True, "error": error.json_body, "request_id": error.request_id}
                return "sent", "Stripe already had this identifier: counted once", note
            if _is_retryable(error):
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
        return "sent", None, event.to_dict()

    @activity.defn(name="queue_storage_overage")
    async def queue_storage_overage(self, request: QueueStorageOverageInput) -> QueueStorageOverageResult:
        """Queue one storage_gb_hour row per paid org over its storage limit, in one statement."""
        hour = parse_hour(request.hour)
        # The level is read now; an hour ahead of the clock would bill storage not yet held, and Stripe
        # refuses timestamps more than five minutes ahead anyway.
        if hour > datetime.now(UTC) + timedelta(minutes=5):
            raise ApplicationError(f"hour {request.hour} is in the future", non_retryable=True)
        async with self.pool.connection() as conn:
            cursor = await conn.execute(query("queue_storage_overage"), {"hour": hour})
            queued = cursor.rowcount
        return QueueStorageOverageResult(hour=request.hour, queued=max(queued, 0))

    @activity.defn(name="start_pending_stripe_reports")
    async def start_pending_stripe_reports(self, request: StartPendingReportsInput) -> StartReportsResult:
        """Start the reports of one page of orgs with pending rows (the backlog trigger of the hourly job).

        Without STRIPE_API_KEY nothing is started: the rows wait, and ``billing status`` says why.
        """
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
        starts = await reporting.start_stripe_reports(
            self.client, self.task_queue, org_ids, parse_hour(request.hour), tuning=request.tuning
        )
        return StartReportsResult(
            started=starts.started,
            already_running=starts.already_running,
            last_org_id=org_ids[-1] if len(org_ids) == request.page_size else None,
        )

    @activity.defn(name="start_stripe_reports")
    async def start_stripe_reports(self, request: StartStripeReportsInput) -> StartReportsResult:
        """Start (or signal) ``stripe-report/{org}/{hour}`` for the given orgs: what a sync calls for the
        orgs its batch queued overage for. Repeating it is harmless."""
        org_ids = [_validate_org_id(org_id) for org_id in request.org_ids]
        starts = await reporting.start_stripe_reports(
            self.client, self.task_queue, org_ids, parse_hour(request.hour), tuning=request.tuning
        )
        return StartReportsResult(
            started=starts.started,
            already_running=starts.already_running,
            stripe_configured=self.stripe is not None,
        )


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)
