"""``POST /v1/stripe/webhook``: verify, record, and hand the event to ``org-billing/{org_id}``.

The answer tells Stripe whether to deliver again, so it is 200 only once the event is durably with
Temporal (signal-with-start accepted), or when redelivering cannot help (an unhandled type, no known
org, an event already applied). Anything transient — PostgreSQL, Temporal or Stripe unavailable — is a
503, and Stripe retries. A bad signature, a stale timestamp or a malformed body is a 400 and records
nothing.

Routing (issue 11, finding 7), customer first: an event belongs to the org whose ``stripe_customer_id``
is the event's customer. Its metadata ``organization_id`` is used only when no org has that customer (the
org workflow then records the customer on the org, unless it already has one: a recorded customer is
never re-pointed). An event whose metadata names another org than its customer's is recorded as
``mismatch`` under the customer's org (logged, shown in ``billing status``, answered 200, not applied). An event whose ``livemode`` differs from the
mode of ``STRIPE_API_KEY`` (``sk_live_``/``rk_live_`` vs ``sk_test_``/``rk_test_``) is recorded as
``ignored`` with the reason and answered 200. Without ``STRIPE_API_KEY`` there is no mode to compare.

Redeliveries: the event id is recorded in ``stripe_webhook_events``. An event the org workflow already
applied is answered 200 at once; any other redelivery (including one whose earlier signal failed) is
signalled again, and the workflow's reducer drops the duplicate by event id.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import psycopg
import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse
from temporalio.service import RPCError

from api.error_responses import ApiError
from api.validation import parse_json, read_body
from billing.adapters.stripe_client import is_refusal
from billing.core.clock import utcnow
from billing.db.sql import query
from billing.domain.ids import canonical_uuid, org_billing_id
from billing.domain.stripe_events import BillingEvent, MalformedStripeEvent, parse_event
from billing.observability.telemetry import WEBHOOK_EVENTS
from billing.orchestration.temporal import signal_org_billing

log = logging.getLogger(__name__)

SIGNATURE_TOLERANCE_SECONDS = 300
# Stripe's events are small (lists inside them are truncated to a page of 10 items, and the largest
# real ones, invoices with many lines and metadata, stay well under 100 KB); 1 MiB bounds what an
# unauthenticated sender can make the server buffer.
MAX_BODY_BYTES = 1024 * 1024
# A real header is a timestamp and one or two v1 signatures (about 150 bytes).
MAX_SIGNATURE_HEADER = 4096
SIGNAL_TIMEOUT = timedelta(seconds=10)


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
            # The age is checked below, both ways, against billing.core.clock (stripe-python reads
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


def key_livemode(settings: Any) -> bool | None:
    """True for a live STRIPE_API_KEY, False for a test one, None when unset or of no known prefix."""
    if settings.stripe_api_key is None:
        return None
    key = settings.stripe_api_key.get_secret_value()
    if key.startswith(("sk_live_", "rk_live_")):
        return True
    if key.startswith(("sk_test_", "rk_test_")):
        return False
    return None


async def _deliver(request: Request, event: BillingEvent) -> JSONResponse:
    """Route and record the event in one statement, then hand it to its org's workflow.

    One PostgreSQL round trip and one Temporal call on the common path; a second statement only when
    Stripe must be asked for the subscription's metadata first.
    """
    state = request.app.state
    ignored = _livemode_ignored(state.settings, event)
    hint = None
    if ignored is None:
        hint = _as_uuid(event.organization_id)
        if hint is None and event.organization_id:
            log.warning("Stripe event %s: organization_id %r is not a UUID", event.id, event.organization_id)
    may_look_up = (
        ignored is None
        and hint is None
        and event.subscription_id is not None
        and _stripe(request) is not None
    )
    row = await _accept(request, event, hint=hint, may_look_up=may_look_up, ignored=ignored)
    if row["route"] == "lookup":
        assert event.subscription_id is not None
        hint = _as_uuid(await _subscription_org(request, event.subscription_id))
        row = await _accept(request, event, hint=hint, may_look_up=False, ignored=None)
    route, org_id = row["route"], row["org_id"]
    if route != "received":
        # Redelivering cannot change the answer: 200, so Stripe stops; the row says why.
        log.warning("Stripe event %s (%s) %s: %s", event.id, event.type, route, row["detail"])
        return JSONResponse({"ok": True, "ignored": row["detail"], "status": route})
    assert org_id is not None
    recorded_customer = row["hint_org_customer"]
    if (
        row["customer_org"] is None
        and recorded_customer is not None
        and event.customer_id is not None
        and recorded_customer != event.customer_id
    ):
        # No org has this customer and the named one has another: applied (the contract routes by
        # metadata here), but the org's customer is never re-pointed; an operator decides.
        log.warning(
            "Stripe event %s: customer %s has no org; metadata names org %s, whose customer is %s "
            "(left as it is)",
            event.id, event.customer_id, org_id, recorded_customer,
        )  # fmt: skip
    # `recorded` is None when a concurrent delivery of the same event inserted it after this
    # statement's snapshot: signal (the workflow drops a duplicate).
    if row["recorded"] == "applied":
        return JSONResponse({"ok": True, "duplicate": True, "workflow_id": org_billing_id(org_id)})
    try:
        await signal_org_billing(
            state.client, state.settings.task_queue, org_id, event, rpc_timeout=SIGNAL_TIMEOUT
        )
    except (RPCError, TimeoutError) as exc:
        raise _Transient(f"Temporal: {exc}") from exc
    # No bookkeeping write after the signal (issue 14): the row stays `received` until the workflow
    # marks it `applied`; a delivery whose signal failed was answered 503 (logged, counted in
    # billing_webhook_deliveries_total) and Stripe delivers it again.
    return JSONResponse({"ok": True, "workflow_id": org_billing_id(org_id)})


async def _accept(
    request: Request, event: BillingEvent, *, hint: str | None, may_look_up: bool, ignored: str | None
) -> dict[str, Any]:
    """Route and record ``event``: one statement (sql/queries/webhook_accept.sql), one round trip."""
    params = {
        "event_id": event.id,
        "event_type": event.type,
        "object_id": event.object_id,
        "created": event.created,
        "customer_id": event.customer_id,
        "org_hint": hint,
        "may_look_up": may_look_up,
        "ignored": ignored,
        "unmatched_detail": _unmatched_detail(event),
    }
    try:
        async with request.app.state.pool.connection() as conn:
            # Autocommit for this one statement: otherwise it opens a transaction that handing the
            # connection back must commit, a second round trip. Switched back before the pool gets
            # the connection (as api/quota.py does).
            await conn.set_autocommit(True)
            try:
                row = await (await conn.execute(query("webhook_accept"), params)).fetchone()
            finally:
                await conn.set_autocommit(False)
    except psycopg.Error as exc:
        raise _Transient(f"PostgreSQL: {type(exc).__name__}") from exc
    assert row is not None
    return dict(row)


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


def _livemode_ignored(settings: Any, event: BillingEvent) -> str | None:
    """Why the event is `ignored` when its livemode is not the mode of STRIPE_API_KEY; None when it may go on."""
    live = key_livemode(settings)
    if live is None or event.livemode is None or event.livemode == live:
        return None
    return (
        f"livemode {str(event.livemode).lower()} event, but STRIPE_API_KEY is a "
        f"{'live' if live else 'test'} key: not applied"
    )


def _stripe(request: Request) -> stripe.StripeClient | None:
    """The process's Stripe client (None without STRIPE_API_KEY)."""
    client: stripe.StripeClient | None = request.app.state.stripe
    return client


async def _subscription_org(request: Request, subscription_id: str) -> str | None:
    """The subscription's metadata `organization_id` from Stripe (None without STRIPE_API_KEY)."""
    client = _stripe(request)
    if client is None:
        return None
    try:
        subscription = await client.v1.subscriptions.retrieve_async(subscription_id)
    except stripe.StripeError as exc:
        if is_refusal(exc):
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
        return canonical_uuid(value)
    except ValueError:
        return None
