"""Builders of realistic Stripe webhook event dicts, for unit tests and (signed) integration tests.

Every builder returns plain JSON-able dicts shaped like Stripe's, trimmed to fields a real payload has.
Invoices come in both shapes:

* `shape="old"`: `invoice.subscription`, `invoice.subscription_details.metadata`, `lines.data[].price`
  (or the legacy `lines.data[].plan` with `legacy_plan=True`), as in API versions before 2025-03-31;
* `shape="new"`: `invoice.parent.subscription_details.{subscription, metadata}` and
  `lines.data[].pricing.price_details.{price, product}` (ids only), as in newer versions.

Subscriptions put `current_period_end` on the subscription (`shape="old"`) or on its items ("new").
Ids are deterministic when given; otherwise they come from a module-level counter.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

Shape = Literal["old", "new"]

OLD_API_VERSION = "2024-06-20"
NEW_API_VERSION = "2026-10-28.endive"

_counter = itertools.count(1)


def next_id(prefix: str) -> str:
    """A fresh Stripe-looking id such as `evt_test_000042`."""
    return f"{prefix}_test_{next(_counter):06d}"


def event(
    event_type: str,
    obj: dict[str, Any],
    *,
    created: int,
    event_id: str | None = None,
    previous_attributes: dict[str, Any] | None = None,
    api_version: str = NEW_API_VERSION,
) -> dict[str, Any]:
    """A Stripe `event` envelope around `obj` (what the webhook endpoint receives as JSON)."""
    data: dict[str, Any] = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id or next_id("evt"),
        "object": "event",
        "api_version": api_version,
        "created": created,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


# --------------------------------------------------------------------------------------------------
# Prices and products


def price(
    price_id: str = "price_pro_monthly",
    *,
    product: str | dict[str, Any] = "prod_pro",
    metered: bool = False,
    with_meter: bool = False,
    unit_amount: int = 2_000,
) -> dict[str, Any]:
    """A recurring price. `metered` sets `usage_type=metered`; `with_meter` attaches a billing meter."""
    return {
        "id": price_id,
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "currency": "usd",
        "livemode": False,
        "lookup_key": None,
        "metadata": {},
        "nickname": None,
        "product": product,
        "recurring": {
            "interval": "month",
            "interval_count": 1,
            "meter": "mtr_test_agent_tasks" if with_meter else None,
            "usage_type": "metered" if (metered or with_meter) else "licensed",
        },
        "type": "recurring",
        "unit_amount": None if metered else unit_amount,
        "unit_amount_decimal": "0.5" if metered else str(unit_amount),
    }


def legacy_plan(
    plan_id: str = "plan_pro", *, product: str = "prod_pro", metered: bool = False
) -> dict[str, Any]:
    """A legacy `plan` object (usage type at top level, not under `recurring`)."""
    return {
        "id": plan_id,
        "object": "plan",
        "active": True,
        "amount": None if metered else 2_000,
        "billing_scheme": "per_unit",
        "currency": "usd",
        "interval": "month",
        "interval_count": 1,
        "meter": None,
        "metadata": {},
        "product": product,
        "usage_type": "metered" if metered else "licensed",
    }


def product(product_id: str = "prod_pro", *, name: str = "Pro", plan: str | None = None) -> dict[str, Any]:
    """A product object (as when expanded, or as `stripe.Product.retrieve` returns it)."""
    return {
        "id": product_id,
        "object": "product",
        "active": True,
        "metadata": {"plan": plan} if plan is not None else {},
        "name": name,
    }


# --------------------------------------------------------------------------------------------------
# Invoices


def invoice_line(
    *,
    shape: Shape,
    price_obj: dict[str, Any],
    subscription_id: str | None,
    legacy_plan: bool = False,
    amount: int = 2_000,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One invoice line for `price_obj`, in the old or the new shape."""
    product_id = price_obj["product"] if isinstance(price_obj["product"], str) else price_obj["product"]["id"]
    line: dict[str, Any] = {
        "id": next_id("il"),
        "object": "line_item",
        "amount": amount,
        "currency": "usd",
        "description": f"1 x {product_id}",
        "livemode": False,
        "metadata": metadata or {},
        "period": {"start": 1_760_000_000, "end": 1_762_600_000},
        "quantity": 1,
    }
    if shape == "old":
        line["type"] = "subscription" if subscription_id else "invoiceitem"
        line["subscription"] = subscription_id
        line["proration"] = False
        if legacy_plan:
            line["plan"] = {
                "id": price_obj["id"],
                "object": "plan",
                "usage_type": price_obj["recurring"]["usage_type"],
                "meter": price_obj["recurring"]["meter"],
                "product": product_id,
                "metadata": {},
            }
            line["price"] = None
        else:
            line["price"] = price_obj
            line["plan"] = None
    else:
        line["parent"] = {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": subscription_id,
                "subscription_item": next_id("si"),
            },
        }
        line["pricing"] = {
            "type": "price_details",
            "price_details": {"price": price_obj["id"], "product": product_id},
            "unit_amount_decimal": price_obj["unit_amount_decimal"],
        }
    return line


def invoice(
    *,
    shape: Shape = "new",
    invoice_id: str | None = None,
    customer_id: str = "cus_test_1",
    subscription_id: str | None = "sub_test_1",
    organization_id: str | None = "org_1",
    billing_reason: str = "subscription_cycle",
    prices: list[dict[str, Any]] | None = None,
    legacy_plan: bool = False,
    status: str = "open",
    attempt_count: int = 1,
    finalization_error: str | None = None,
) -> dict[str, Any]:
    """An invoice object. `prices` defaults to one licensed plan price."""
    invoice_id = invoice_id or next_id("in")
    prices = prices if prices is not None else [price()]
    sub_metadata = {"organization_id": organization_id, "plan": "pro"} if organization_id else {}
    lines = [
        invoice_line(shape=shape, price_obj=p, subscription_id=subscription_id, legacy_plan=legacy_plan)
        for p in prices
    ]
    obj: dict[str, Any] = {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "amount_due": sum(line["amount"] for line in lines),
        "amount_paid": 0 if status != "paid" else sum(line["amount"] for line in lines),
        "attempt_count": attempt_count,
        "attempted": attempt_count > 0,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "currency": "usd",
        "customer": customer_id,
        "last_finalization_error": {"message": finalization_error, "type": "card_error"}
        if finalization_error
        else None,
        "lines": {
            "object": "list",
            "data": lines,
            "has_more": False,
            "total_count": len(lines),
            "url": f"/v1/invoices/{invoice_id}/lines",
        },
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None,
        "status": status,
    }
    if shape == "old":
        obj["subscription"] = subscription_id
        obj["subscription_details"] = {"metadata": sub_metadata}
    else:
        obj["parent"] = (
            {
                "type": "subscription_details",
                "quote_details": None,
                "subscription_details": {"metadata": sub_metadata, "subscription": subscription_id},
            }
            if subscription_id
            else None
        )
    return obj


def invoice_event(
    event_type: str, inv: dict[str, Any], *, created: int, event_id: str | None = None
) -> dict[str, Any]:
    """An `invoice.*` event; the invoice's status follows the event type as Stripe's would."""
    status = {
        "invoice.paid": "paid",
        "invoice.payment_succeeded": "paid",
        "invoice.voided": "void",
        "invoice.marked_uncollectible": "uncollectible",
    }.get(event_type, inv["status"])
    api_version = OLD_API_VERSION if "subscription" in inv else NEW_API_VERSION
    return event(
        event_type, {**inv, "status": status}, created=created, event_id=event_id, api_version=api_version
    )


# --------------------------------------------------------------------------------------------------
# Subscriptions


def subscription(
    *,
    shape: Shape = "new",
    subscription_id: str = "sub_test_1",
    customer_id: str = "cus_test_1",
    status: str = "active",
    plan: str | None = "pro",
    downgrade_to: str | None = None,
    organization_id: str | None = "org_1",
    cancel_at_period_end: bool = False,
    cancel_at: int | None = None,
    current_period_end: int = 1_762_600_000,
    plan_price: dict[str, Any] | None = None,
    metered_prices: list[dict[str, Any]] | None = None,
    schedule_id: str | None = None,
    legacy_plan: bool = False,
) -> dict[str, Any]:
    """A subscription with one licensed plan item plus optional metered items.

    `plan` and `downgrade_to` go to the subscription's metadata (None leaves the key out).
    """
    metadata: dict[str, str] = {}
    if organization_id is not None:
        metadata["organization_id"] = organization_id
    if plan is not None:
        metadata["plan"] = plan
    if downgrade_to is not None:
        metadata["downgrade_to"] = downgrade_to
    items = []
    for p in [plan_price or price(), *(metered_prices or [])]:
        item: dict[str, Any] = {
            "id": next_id("si"),
            "object": "subscription_item",
            "metadata": {},
            "price": p,
            "quantity": None if p["recurring"]["usage_type"] == "metered" else 1,
            "subscription": subscription_id,
        }
        if legacy_plan:
            item["plan"] = legacy_plan_from_price(p)
        if shape == "new":
            item["current_period_start"] = current_period_end - 2_592_000
            item["current_period_end"] = current_period_end
        items.append(item)
    obj: dict[str, Any] = {
        "id": subscription_id,
        "object": "subscription",
        "cancel_at": cancel_at,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": None,
        "collection_method": "charge_automatically",
        "customer": customer_id,
        "items": {"object": "list", "data": items, "has_more": False, "total_count": len(items)},
        "livemode": False,
        "metadata": metadata,
        "schedule": schedule_id,
        "status": status,
    }
    if shape == "old":
        obj["current_period_start"] = current_period_end - 2_592_000
        obj["current_period_end"] = current_period_end
    return obj


def legacy_plan_from_price(p: dict[str, Any]) -> dict[str, Any]:
    product_id = p["product"] if isinstance(p["product"], str) else p["product"]["id"]
    return legacy_plan(p["id"], product=product_id, metered=p["recurring"]["usage_type"] == "metered")


def subscription_event(
    event_type: str, sub: dict[str, Any], *, created: int, event_id: str | None = None
) -> dict[str, Any]:
    api_version = OLD_API_VERSION if "current_period_end" in sub else NEW_API_VERSION
    return event(event_type, sub, created=created, event_id=event_id, api_version=api_version)


# --------------------------------------------------------------------------------------------------
# Subscription schedules


def subscription_schedule(
    *,
    schedule_id: str = "sub_sched_test_1",
    customer_id: str = "cus_test_1",
    subscription_id: str | None = "sub_test_1",
    status: str = "active",
    current_plan: str = "pro",
    next_plan: str | None = "team",
    phase_boundary: int = 1_762_600_000,
    organization_id: str | None = "org_1",
) -> dict[str, Any]:
    """A schedule with a current phase on `current_plan` and, unless `next_plan` is None, a next phase.

    Phase metadata carries `plan` (it becomes the subscription's metadata during that phase).
    """
    phases: list[dict[str, Any]] = [
        {
            "start_date": phase_boundary - 2_592_000,
            "end_date": phase_boundary,
            "items": [{"price": f"price_{current_plan}_monthly", "quantity": 1, "metadata": {}}],
            "metadata": {"plan": current_plan},
        }
    ]
    if next_plan is not None:
        phases.append(
            {
                "start_date": phase_boundary,
                "end_date": phase_boundary + 2_592_000,
                "items": [{"price": f"price_{next_plan}_monthly", "quantity": 1, "metadata": {}}],
                "metadata": {"plan": next_plan},
            }
        )
    ended = status not in ("active", "not_started")
    return {
        "id": schedule_id,
        "object": "subscription_schedule",
        "canceled_at": 1_761_000_000 if status == "canceled" else None,
        "completed_at": 1_762_600_000 if status == "completed" else None,
        "current_phase": None
        if ended or status == "not_started"
        else {"start_date": phases[0]["start_date"], "end_date": phases[0]["end_date"]},
        "customer": customer_id,
        "end_behavior": "release",
        "livemode": False,
        "metadata": {"organization_id": organization_id} if organization_id else {},
        "phases": phases,
        "released_at": 1_761_000_000 if status == "released" else None,
        "released_subscription": subscription_id if status == "released" else None,
        "status": status,
        "subscription": subscription_id,
    }


def schedule_event(
    event_type: str, sched: dict[str, Any], *, created: int, event_id: str | None = None
) -> dict[str, Any]:
    return event(event_type, sched, created=created, event_id=event_id)
