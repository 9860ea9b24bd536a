"""Pure parsing of Stripe webhook events into the small `BillingEvent` the org workflow consumes.

No I/O happens here: the webhook receiver has already verified the signature and hands us the event
JSON as a dict. We read the few fields the payment state machine needs, from every payload shape
Stripe has used:

* invoices: the older `invoice.subscription` + `lines.data[].price` (or the legacy `lines.data[].plan`)
  and the newer `invoice.parent.subscription_details` + `lines.data[].pricing.price_details`;
* subscriptions: `current_period_end` on the subscription (older API versions) or on its items
  (newer ones);
* subscription schedules: the plan of the next phase, from that phase's metadata `plan`.

Decision on the newer invoice line shape: `pricing.price_details` carries only the price id and the
product id (the price is an object only when the payload was expanded, which webhook payloads never
are), and a subscription line's `metadata` mirrors the *subscription's* metadata, not the price's, so
it cannot tell a metered line from a licensed one. Therefore an invoice is classified as follows:
`metered` when `billing_reason == "subscription_threshold"` or any line's price (old `price`, legacy
`plan`, or an expanded `price_details.price`) is metered or has a meter; otherwise `plan`. Lines whose
price is only an id are listed in `unresolved_price_ids`, so the workflow can look those prices up in
Stripe before it treats a *failed* invoice as a plan failure (see `ResolveInvoiceKind` in
`billing/domain/payment_state.py`). Only the first page of lines is in the payload (`lines.has_more`); we do
not page through them (that would be I/O) — a metered line beyond the first page of a non-threshold
invoice is not seen.

This module imports only the standard library, pydantic and billing.domain.plans so that the Temporal workflow sandbox can
import it (the org workflow receives `BillingEvent` as its signal payload).
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from billing.domain.plans import PLANS, Plan

ObjectKind = Literal["invoice", "subscription", "subscription_schedule"]
InvoiceKind = Literal["metered", "plan"]

SUBSCRIPTION_EVENT_TYPES: Final[frozenset[str]] = frozenset(
    {"customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted"}
)
SCHEDULE_EVENT_TYPES: Final[frozenset[str]] = frozenset(
    {
        "subscription_schedule.created",
        "subscription_schedule.updated",
        "subscription_schedule.completed",
        "subscription_schedule.canceled",
        "subscription_schedule.released",
    }
)
INVOICE_EVENT_TYPES: Final[frozenset[str]] = frozenset(
    {
        "invoice.payment_failed",
        "invoice.payment_succeeded",
        "invoice.paid",
        "invoice.marked_uncollectible",
        "invoice.voided",
    }
)
HANDLED_EVENT_TYPES: Final[frozenset[str]] = (
    SUBSCRIPTION_EVENT_TYPES | SCHEDULE_EVENT_TYPES | INVOICE_EVENT_TYPES
)

# Schedule statuses in which the schedule still drives the subscription's future phases.
ACTIVE_SCHEDULE_STATUSES: Final[frozenset[str]] = frozenset({"not_started", "active"})


class MalformedStripeEvent(ValueError):
    """A handled event type whose payload lacks a field we cannot do without (an id, `created`...)."""


class BillingEvent(BaseModel):
    """The part of a Stripe event the payment state machine needs. Small: it is a Temporal signal payload.

    Plan names (`metadata_plan`, `downgrade_to`, `product_plan`, `schedule_next_plan`) are already
    validated: anything but `free`, `pro`, `team` became None and is described in `warnings`.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    type: str
    created: int
    object_kind: ObjectKind
    object_id: str = Field(description="invoice id, subscription id or subscription schedule id")
    customer_id: str | None = None
    subscription_id: str | None = None
    organization_id: str | None = Field(
        default=None, description="hint from the subscription's metadata `organization_id`"
    )
    livemode: bool | None = Field(default=None, description="the event's `livemode` (None if absent)")

    # Invoices.
    billing_reason: str | None = None
    invoice_kind: InvoiceKind | None = None
    unresolved_price_ids: list[str] = Field(
        default_factory=list,
        description="price ids of lines whose usage type the payload does not show (newer line shape)",
    )
    failure_reason: str | None = None

    # Subscriptions.
    subscription_status: str | None = None
    cancel_at_period_end: bool = False
    cancel_at: int | None = None
    current_period_end: int | None = None
    metadata_plan: Plan | None = None
    downgrade_to: Plan | None = None
    product_id: str | None = None
    product_plan: Plan | None = Field(
        default=None, description="from the product's metadata `plan` or name, when the product is expanded"
    )
    schedule_id: str | None = Field(
        default=None, description="subscription schedule attached to the subscription"
    )

    # Subscription schedules.
    schedule_active: bool | None = None
    schedule_next_plan: Plan | None = None

    warnings: list[str] = Field(default_factory=list)

    @property
    def cancellation_scheduled(self) -> bool:
        """True when the subscription will end at a future date (period end or an explicit `cancel_at`)."""
        return self.cancel_at_period_end or self.cancel_at is not None


# --------------------------------------------------------------------------------------------------
# Small pure helpers, also usable by the activities that retrieve products and prices from Stripe.


def validate_plan(value: object, *, source: str, warnings: list[str]) -> Plan | None:
    """Return `value` if it is a known plan name, else None (with a warning naming `source`)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value in PLANS:
        return value  # type: ignore[return-value]
    warnings.append(f"{source}={value!r} is not one of {', '.join(PLANS)}; ignored")
    return None


def plan_from_product(product: dict[str, Any], warnings: list[str]) -> Plan | None:
    """The plan a Stripe product stands for: its metadata `plan`, else `team` or `pro` in its name.

    This is the rule of the system this replaces; a product named neither gives None.
    """
    metadata = _dict(product.get("metadata"))
    plan = validate_plan(
        metadata.get("plan"), source=f"product {product.get('id')} metadata plan", warnings=warnings
    )
    if plan is not None:
        return plan
    name = str(product.get("name") or "").lower()
    if "team" in name:
        return "team"
    if "pro" in name:
        return "pro"
    return None


def price_is_metered(price: dict[str, Any]) -> bool:
    """True for a metered price (`recurring.usage_type == "metered"` or a billing meter) or legacy plan.

    Legacy `plan` objects carry `usage_type` / `meter` at top level instead of under `recurring`.
    """
    recurring = _dict(price.get("recurring"))
    for source in (recurring, price):
        if source.get("usage_type") == "metered" or source.get("meter"):
            return True
    return False


# --------------------------------------------------------------------------------------------------


def parse_event(event: dict[str, Any]) -> BillingEvent | None:
    """Turn a signature-verified Stripe event dict into a `BillingEvent`, or None for types we ignore.

    Raises `MalformedStripeEvent` when a handled event lacks its id, `created`, or object id.
    """
    event_type = event.get("type")
    if event_type not in HANDLED_EVENT_TYPES:
        return None
    event_id = event.get("id")
    created = event.get("created")
    obj = _dict(_dict(event.get("data")).get("object"))
    if not isinstance(event_id, str) or not event_id:
        raise MalformedStripeEvent(f"{event_type} event without an id")
    if not isinstance(created, int) or isinstance(created, bool):
        raise MalformedStripeEvent(f"event {event_id} ({event_type}) without an integer `created`")
    object_id = obj.get("id")
    if not isinstance(object_id, str) or not object_id:
        raise MalformedStripeEvent(f"event {event_id} ({event_type}) without data.object.id")

    common: dict[str, Any] = {
        "id": event_id,
        "type": event_type,
        "created": created,
        "object_id": object_id,
        "customer_id": _id_of(obj.get("customer")),
        "livemode": livemode if isinstance(livemode := event.get("livemode"), bool) else None,
    }
    warnings: list[str] = []
    if event_type in INVOICE_EVENT_TYPES:
        fields = _invoice_fields(obj, event_type, warnings)
    elif event_type in SUBSCRIPTION_EVENT_TYPES:
        fields = _subscription_fields(obj, warnings)
    else:
        fields = _schedule_fields(obj, warnings)
    return BillingEvent(**common, **fields, warnings=warnings)


def _invoice_fields(invoice: dict[str, Any], event_type: str, warnings: list[str]) -> dict[str, Any]:
    invoice_id = invoice["id"]
    # Newer API versions: invoice.parent.subscription_details.{subscription, metadata}.
    # Older ones: invoice.subscription (an id, or an object when expanded) and invoice.subscription_details.
    parent_details = _dict(_dict(invoice.get("parent")).get("subscription_details"))
    subscription_id = _id_of(parent_details.get("subscription")) or _id_of(invoice.get("subscription"))
    sub_metadata = _dict(parent_details.get("metadata")) or _dict(
        _dict(invoice.get("subscription_details")).get("metadata")
    )
    billing_reason = invoice.get("billing_reason")

    metered = billing_reason == "subscription_threshold"
    unresolved: list[str] = []
    lines = _dict(invoice.get("lines")).get("data")
    for line in lines if isinstance(lines, list) else []:
        line = _dict(line)
        price = _dict(line.get("price")) or _dict(line.get("plan"))
        if price:
            metered = metered or price_is_metered(price)
            continue
        details_price = _dict(_dict(line.get("pricing")).get("price_details")).get("price")
        if isinstance(details_price, dict):
            metered = metered or price_is_metered(details_price)
        elif isinstance(details_price, str) and details_price not in unresolved:
            unresolved.append(details_price)

    failure_reason: str | None = None
    if event_type == "invoice.payment_failed":
        failure_reason = f"invoice {invoice_id} payment failed (attempt {invoice.get('attempt_count') or 1})"
        error_message = _dict(invoice.get("last_finalization_error")).get("message")
        if error_message:
            failure_reason += f": {error_message}"
    elif event_type == "invoice.marked_uncollectible":
        failure_reason = f"invoice {invoice_id} marked uncollectible"

    return {
        "object_kind": "invoice",
        "subscription_id": subscription_id,
        "organization_id": _str_or_none(sub_metadata.get("organization_id")),
        "billing_reason": billing_reason if isinstance(billing_reason, str) else None,
        "invoice_kind": "metered" if metered else "plan",
        # Once a metered line is known the invoice is metered whatever the other lines are.
        "unresolved_price_ids": [] if metered else unresolved,
        "failure_reason": failure_reason,
    }


def _subscription_fields(subscription: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    subscription_id = subscription["id"]
    metadata = _dict(subscription.get("metadata"))
    items = [_dict(item) for item in _list(_dict(subscription.get("items")).get("data"))]
    plan_item = _plan_item(items)
    price = _dict(plan_item.get("price")) or _dict(plan_item.get("plan")) or _dict(subscription.get("plan"))

    product = price.get("product")
    product_plan = plan_from_product(product, warnings) if isinstance(product, dict) else None

    # Newer API versions moved current_period_end from the subscription onto each item.
    period_end = subscription.get("current_period_end")
    if not isinstance(period_end, int):
        period_end = plan_item.get("current_period_end")
    cancel_at = subscription.get("cancel_at")
    return {
        "object_kind": "subscription",
        "subscription_id": subscription_id,
        "organization_id": _str_or_none(metadata.get("organization_id")),
        "subscription_status": _str_or_none(subscription.get("status")),
        "cancel_at_period_end": bool(subscription.get("cancel_at_period_end")),
        "cancel_at": cancel_at if isinstance(cancel_at, int) else None,
        "current_period_end": period_end if isinstance(period_end, int) else None,
        "metadata_plan": validate_plan(
            metadata.get("plan"), source=f"subscription {subscription_id} metadata plan", warnings=warnings
        ),
        "downgrade_to": validate_plan(
            metadata.get("downgrade_to"),
            source=f"subscription {subscription_id} metadata downgrade_to",
            warnings=warnings,
        ),
        "product_id": _id_of(product),
        "product_plan": product_plan,
        "schedule_id": _id_of(subscription.get("schedule")),
    }


def _plan_item(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The subscription item that carries the plan: the first licensed (non-metered) one, else the first.

    A subscription typically has one licensed price (the plan fee) plus metered prices for overage;
    the metered ones often share a generic "usage" product that says nothing about the plan.
    """
    for item in items:
        price = _dict(item.get("price")) or _dict(item.get("plan"))
        if price and not price_is_metered(price):
            return item
    return items[0] if items else {}


def _schedule_fields(schedule: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    schedule_id = schedule["id"]
    status = schedule.get("status")
    phases = [_dict(phase) for phase in _list(schedule.get("phases"))]
    current = _dict(schedule.get("current_phase"))
    # The next phase is the first one starting at or after the current phase's end; a schedule that has
    # not started yet has no current phase, and its first phase is the next one.
    next_phase: dict[str, Any] = {}
    if status not in ACTIVE_SCHEDULE_STATUSES:
        pass  # an ended schedule has no next phase, whatever its phase list still says
    elif current:
        current_end = current.get("end_date")
        if isinstance(current_end, int):
            later = [
                p for p in phases if isinstance(p.get("start_date"), int) and p["start_date"] >= current_end
            ]
            next_phase = min(later, key=lambda p: p["start_date"], default={})
    elif phases:
        next_phase = phases[0]
    next_plan = validate_plan(
        _dict(next_phase.get("metadata")).get("plan"),
        source=f"subscription schedule {schedule_id} next phase metadata plan",
        warnings=warnings,
    )
    return {
        "object_kind": "subscription_schedule",
        "subscription_id": _id_of(schedule.get("subscription")),
        "organization_id": _str_or_none(_dict(schedule.get("metadata")).get("organization_id")),
        "schedule_active": status in ACTIVE_SCHEDULE_STATUSES,
        "schedule_next_plan": next_plan,
    }


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _id_of(value: object) -> str | None:
    """An id field that Stripe sends either as the id string or, when expanded, as the object."""
    if isinstance(value, dict):
        return _str_or_none(value.get("id"))
    return _str_or_none(value)
