"""``POST /v1/stripe/webhook``: verify, record, and hand the event to ``org-billing/{org_id}``.

The answer tells Stripe whether to deliver again, so it is 200 only once the event is durably with
Temporal (signal-with-start accepted), or when redelivering cannot help (an unhandled type, no known
org, an event already applied). Anything transient — PostgreSQL, Temporal or Stripe unavailable — is a
503, and Stripe retries. A bad signature, a stale timestamp or a malformed body is a 400 and records
nothing.

Redeliveries: the event id is recorded in ``stripe_webhook_events``. An event the org workflow already
applied is answered 200 at once; any other redelivery (including one whose earlier signal failed) is
signalled again, and the workflow's reducer drops the duplicate by event id.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse
from temporalio.service import RPCError

from api.errors import ApiError
from api.validation import parse_json, read_body
from billing.clock import utcnow
from billing.ids import org_billing_id
from billing.org_billing import signal_org_billing
from billing.sql import query
from billing.stripe_client import make_stripe_client
from billing.stripe_events import BillingEvent, MalformedStripeEvent, parse_event
from billing.telemetry import WEBHOOK_EVENTS

log = logging.getLogger(__name__)

SIGNATURE_TOLERANCE_SECONDS = 300
# Stripe's events are small (lists inside them are truncated to a page of 10 items, and the largest
# real ones, invoices with many lines and metadata, stay well under 100 KB); 1 MiB bounds what an
# unauthenticated sender can make the server buffer.
MAX_BODY_BYTES = 1024 * 1024
# A real header is a timestamp and one or two v1 signatures (about 150 bytes).
MAX_SIGNATURE_HEADER = 4096
SIGNAL_TIMEOUT = timedelta(seconds=10)
# Stripe's own call, made only when neither metadata nor the customer names the org.
STRIPE_LOOKUP_TIMEOUT = 10.0


class _Transient(Exception):
    """A dependency failed; answer 503 so that Stripe delivers again."""


async def stripe_webhook(request: Request) -> JSONResponse:
    """Verify the Stripe-Signature, record the event and signal the org's workflow."""
    try:
        response = await _receive(request)
    except ApiError as exc:
        WEBHOOK_EVENTS.labels(str(exc.status)).inc()
        raise
    WEBHOOK_EVENTS.labels(str(response.status_code)).inc()
    return response


async def _receive(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    if settings.stripe_webhook_secret is None:
        raise ApiError(503, "STRIPE_WEBHOOK_SECRET is not set: webhooks are not accepted until it is")
    # The signature header is checked before a byte of the body is read: an unsigned request costs
    # nothing, whatever it sends.
    header = request.headers.get("stripe-signature")
    if not header:
        raise ApiError(400, "missing Stripe-Signature header")
    if len(header) > MAX_SIGNATURE_HEADER:
        raise ApiError(400, "Stripe-Signature header too long")
    body = await read_body(request, MAX_BODY_BYTES)
    try:
        stripe.WebhookSignature.verify_header(
            body.decode("utf-8"),
            header,
            settings.stripe_webhook_secret.get_secret_value(),
            # The age is checked below, both ways, against billing.clock (stripe-python reads
            # time.time() and only refuses old timestamps).
            tolerance=None,
        )
    except UnicodeDecodeError:
        raise ApiError(400, "body is not UTF-8") from None
    except stripe.SignatureVerificationError as exc:
        raise ApiError(400, f"bad Stripe-Signature: {exc.user_message or exc}") from None
    _check_timestamp(header)
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise ApiError(400, "body is not a Stripe event object")
    try:
        event = parse_event(payload)
    except MalformedStripeEvent as exc:
        raise ApiError(400, f"malformed Stripe event: {exc}") from None
    if event is None:
        log.info("ignored Stripe event %s of unhandled type %s", payload.get("id"), payload.get("type"))
        return JSONResponse({"ok": True, "ignored": f"unhandled event type {payload.get('type')!r}"})
    for warning in event.warnings:
        log.warning("Stripe event %s: %s", event.id, warning)
    try:
        return await _deliver(request, event)
    except _Transient as exc:
        log.warning("Stripe event %s not handed over, Stripe will retry: %s", event.id, exc)
        raise ApiError(503, f"event {event.id} could not be handed over ({exc}); deliver it again") from None


async def _deliver(request: Request, event: BillingEvent) -> JSONResponse:
    state = request.app.state
    org_id = await _find_org(request, event)
    record = {
        "event_id": event.id,
        "event_type": event.type,
        "org_id": org_id,
        "object_id": event.object_id,
        "created": event.created,
        "status": "received" if org_id else "unmatched",
        "detail": None if org_id else _unmatched_detail(event),
    }
    try:
        async with state.pool.connection() as conn:
            row = await (await conn.execute(query("webhook_record_event"), record)).fetchone()
    except psycopg.Error as exc:
        raise _Transient(f"PostgreSQL: {type(exc).__name__}") from exc
    if org_id is None:
        log.warning("Stripe event %s (%s): %s", event.id, event.type, record["detail"])
        return JSONResponse({"ok": True, "ignored": record["detail"]})
    # No row: a concurrent delivery of the same event inserted it after this statement's snapshot.
    if row is not None and row["status"] == "applied":
        return JSONResponse({"ok": True, "duplicate": True, "workflow_id": org_billing_id(org_id)})

    try:
        await signal_org_billing(
            state.client, state.settings.task_queue, org_id, "stripe_event", event, rpc_timeout=SIGNAL_TIMEOUT
        )
    except (RPCError, TimeoutError) as exc:
        raise _Transient(f"Temporal: {exc}") from exc
    try:
        async with state.pool.connection() as conn:
            await conn.execute(query("webhook_mark_signalled"), {"event_id": event.id, "org_id": org_id})
    except psycopg.Error as exc:
        # The signal is durable: the workflow marks the event applied; only this bookkeeping is lost.
        log.warning("Stripe event %s signalled but not marked so: %s", event.id, exc)
    return JSONResponse({"ok": True, "workflow_id": org_billing_id(org_id)})


def _check_timestamp(header: str) -> None:
    """400 when the signed timestamp lies more than the tolerance in the past or in the future.

    stripe-python refuses old timestamps only; a future one would let a captured request (or one
    signed with a skewed clock) be replayed for as long as it is ahead.
    """
    stamps = [item.split("=", 1)[1] for item in header.split(",") if item.strip().startswith("t=")]
    try:
        signed_at = int(stamps[0])
    except (IndexError, ValueError):
        raise ApiError(400, "bad Stripe-Signature: no timestamp") from None
    ahead = signed_at - utcnow().timestamp()
    if ahead < -SIGNATURE_TOLERANCE_SECONDS:
        # stripe-python's own words for it.
        raise ApiError(400, f"bad Stripe-Signature: Timestamp outside the tolerance zone ({signed_at})")
    if ahead > SIGNATURE_TOLERANCE_SECONDS:
        raise ApiError(
            400,
            f"bad Stripe-Signature: Timestamp outside the tolerance zone ({signed_at}): "
            f"{int(ahead)} s in the future",
        )


def _unmatched_detail(event: BillingEvent) -> str:
    return (
        f"no organization for {event.object_kind} {event.object_id} "
        f"(metadata organization_id {event.organization_id!r}, customer {event.customer_id!r}, "
        f"subscription {event.subscription_id!r})"
    )


async def _find_org(request: Request, event: BillingEvent) -> str | None:
    """The org: metadata `organization_id`, else the customer's billing row, else the subscription's
    metadata retrieved from Stripe. None when no existing org matches."""
    hint = _as_uuid(event.organization_id)
    if hint is None and event.organization_id:
        log.warning("Stripe event %s: organization_id %r is not a UUID", event.id, event.organization_id)
    org_id = await _lookup_org(request, hint, event.customer_id)
    if org_id is not None or event.subscription_id is None:
        return org_id
    from_stripe = _as_uuid(await _subscription_org(request, event.subscription_id))
    if from_stripe is None:
        return None
    return await _lookup_org(request, from_stripe, None)


async def _lookup_org(request: Request, org_hint: str | None, customer_id: str | None) -> str | None:
    if org_hint is None and customer_id is None:
        return None
    try:
        async with request.app.state.pool.connection() as conn:
            cursor = await conn.execute(
                query("webhook_find_org"), {"org_hint": org_hint, "customer_id": customer_id}
            )
            row = await cursor.fetchone()
    except psycopg.Error as exc:
        raise _Transient(f"PostgreSQL: {type(exc).__name__}") from exc
    return row["org_id"] if row else None


async def _subscription_org(request: Request, subscription_id: str) -> str | None:
    """The subscription's metadata `organization_id` from Stripe (None without STRIPE_API_KEY)."""
    app_state = request.app.state
    if not hasattr(app_state, "webhook_stripe"):
        app_state.webhook_stripe = make_stripe_client(app_state.settings, timeout=STRIPE_LOOKUP_TIMEOUT)
    client: stripe.StripeClient | None = app_state.webhook_stripe
    if client is None:
        return None
    try:
        subscription = await client.v1.subscriptions.retrieve_async(subscription_id)
    except stripe.StripeError as exc:
        status = exc.http_status
        if status is not None and 400 <= status < 500 and status not in (409, 429):
            log.warning("subscription %s not readable from Stripe: %s", subscription_id, exc)
            return None
        raise _Transient(f"Stripe: {type(exc).__name__}") from exc
    metadata: Any = subscription.to_dict().get("metadata") or {}
    value = metadata.get("organization_id")
    return value if isinstance(value, str) else None


def _as_uuid(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None
