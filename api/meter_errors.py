"""``POST /v1/stripe/meter-errors``: Stripe's asynchronous meter errors, as thin (v2) event notifications.

Stripe accepts a meter event and may only later find it cannot apply it (no meter for its event name, a
customer it cannot find, an invalid value...). It says so with ``v1.billing.meter.error_report_triggered``
and ``v1.billing.meter.no_meter_found``, delivered by an event destination as thin notifications:
verified with ``STRIPE_WEBHOOK_SECRET`` exactly like the webhook endpoint, parsed by stripe-python's
``StripeClient.parse_event_notification``, their details fetched from Stripe (``fetch_event``), then
recorded in ``stripe_meter_errors`` (by event id: a redelivery is recorded once), matched to the org of
the report rows Stripe names, counted on ``/metrics`` and shown by ``billing status`` and reconcile.

200 once recorded (or for another event type); 400 bad signature or body; 503 when PostgreSQL or
Stripe could not be reached, so Stripe delivers again.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse

from activities.stripe_reports import identifier_of_key
from api.error_responses import ApiError
from billing.adapters.stripe_client import parsing_client
from billing.db.sql import query
from billing.observability.telemetry import STRIPE_METER_ERRORS

log = logging.getLogger(__name__)

METER_ERROR_TYPES = frozenset({"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"})
SIGNATURE_TOLERANCE_SECONDS = 300
MAX_BODY_BYTES = 1_000_000


async def stripe_meter_errors(request: Request) -> JSONResponse:
    """Verify, fetch and record one meter error notification (see the module docstring)."""
    state = request.app.state
    settings = state.settings
    if settings.stripe_webhook_secret is None:
        raise ApiError(503, "STRIPE_WEBHOOK_SECRET is not set: event notifications are not accepted until it is")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"body over {MAX_BODY_BYTES:,} bytes")
    header = request.headers.get("stripe-signature")
    if not header:
        raise ApiError(400, "missing Stripe-Signature header")
    client: stripe.StripeClient | None = state.stripe
    # Without STRIPE_API_KEY the notification is still verified and recorded, without its details.
    parser = parsing_client(client)
    try:
        notification = parser.parse_event_notification(
            body, header, settings.stripe_webhook_secret.get_secret_value(), SIGNATURE_TOLERANCE_SECONDS
        )
    except stripe.SignatureVerificationError as exc:
        raise ApiError(400, f"bad Stripe-Signature: {exc.user_message or exc}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"not a Stripe event notification: {exc}") from None
    if notification.type not in METER_ERROR_TYPES:
        return JSONResponse({"ok": True, "ignored": f"unhandled event type {notification.type!r}"})
    record = await _details(client, notification)
    try:
        async with state.pool.connection() as conn:
            row = await (await conn.execute(query("meter_error_record"), record)).fetchone()
    except psycopg.Error as exc:
        raise ApiError(503, f"event {notification.id} not recorded (PostgreSQL: {type(exc).__name__})") from None
    assert row is not None
    if row["inserted"]:
        STRIPE_METER_ERRORS.labels(notification.type).inc()
        log.error(
            "Stripe meter error %s (%s): %s; org %s; identifiers %s",
            notification.id,
            record["code"],
            record["message"],
            row["org_id"],
            record["identifiers"][:5],
        )
    return JSONResponse({"ok": True, "org_id": row["org_id"]})


async def _details(client: stripe.StripeClient | None, notification: Any) -> dict[str, Any]:
    """The notification's full event from Stripe: error code, message, count and sample identifiers."""
    related = getattr(notification, "related_object", None)
    record: dict[str, Any] = {
        "event_id": notification.id,
        "event_type": notification.type,
        "meter_id": related.id if related is not None else None,
        "code": None,
        "message": "details not fetched: STRIPE_API_KEY is not set",
        "error_count": 0,
        "identifiers": [],
    }
    if client is None:
        return record
    try:
        event = await notification.fetch_event_async()
    except stripe.StripeError as exc:
        raise ApiError(503, f"event {notification.id}: Stripe answered {exc.http_status or 'nothing'}") from None
    data = event.to_dict().get("data") or {}
    reason = data.get("reason") or {}
    identifiers: list[str] = []
    codes: list[str] = []
    messages: list[str] = []
    for error_type in reason.get("error_types") or []:
        codes.append(str(error_type.get("code")))
        for sample in error_type.get("sample_errors") or []:
            messages.append(str(sample.get("error_message") or ""))
            key = str((sample.get("request") or {}).get("identifier") or "")
            if key:
                # Stripe names the request's idempotency key; ours embeds the row's identifier.
                identifiers += [key, identifier_of_key(key)]
    record.update(
        code=",".join(dict.fromkeys(codes)) or None,
        message=next((m for m in messages if m), None) or data.get("developer_message_summary"),
        error_count=int(reason.get("error_count") or 0),
        identifiers=list(dict.fromkeys(identifiers)),
    )
    return record
