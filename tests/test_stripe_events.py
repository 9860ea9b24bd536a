"""Unit tests of `billing.domain.stripe_events.parse_event` on realistic payloads of every handled shape."""

from __future__ import annotations

import json

import pytest

from billing.domain.stripe_events import (
    HANDLED_EVENT_TYPES,
    BillingEvent,
    MalformedStripeEvent,
    parse_event,
    plan_from_product,
    price_is_metered,
)
from billing.testing import stripe_payloads as sp

T0 = 1_761_000_000
METERED = sp.price("price_tasks", product="prod_usage", metered=True)
WITH_METER = sp.price("price_tasks_meter", product="prod_usage", with_meter=True)


def parsed(event: dict) -> BillingEvent:
    result = parse_event(event)
    assert result is not None
    return result


# --------------------------------------------------------------------------------------------------
# Envelope


def test_ignored_types_give_none() -> None:
    for event_type in (
        "customer.created",
        "invoice.created",
        "invoice.finalized",
        "charge.failed",
        "whatever",
    ):
        assert parse_event(sp.event(event_type, {"id": "x_1"}, created=T0)) is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("id"),
        lambda e: e.pop("created"),
        lambda e: e.update(created="yesterday"),
        lambda e: e["data"]["object"].pop("id"),
        lambda e: e.update(data={}),
    ],
)
def test_handled_type_without_required_fields_is_malformed(mutate) -> None:
    event = sp.invoice_event("invoice.paid", sp.invoice(), created=T0)
    mutate(event)
    with pytest.raises(MalformedStripeEvent):
        parse_event(event)


def test_every_handled_type_parses_and_survives_a_json_round_trip() -> None:
    objects = {
        "invoice": sp.invoice(invoice_id="in_1"),
        "customer.subscription": sp.subscription(),
        "subscription_schedule": sp.subscription_schedule(),
    }
    for event_type in sorted(HANDLED_EVENT_TYPES):
        prefix = event_type.rsplit(".", 1)[0]
        event = sp.event(event_type, objects[prefix], created=T0, event_id=f"evt_{event_type}")
        parsed_event = parsed(event)
        assert parsed_event.id == f"evt_{event_type}"
        assert parsed_event.type == event_type
        assert parsed_event.created == T0
        assert parsed_event.customer_id == "cus_test_1"
        # It travels as a Temporal signal payload: JSON in, equal model out.
        assert BillingEvent.model_validate(json.loads(parsed_event.model_dump_json())) == parsed_event


# --------------------------------------------------------------------------------------------------
# Invoices


@pytest.mark.parametrize("shape", ["old", "new"])
def test_plan_invoice_failed_both_shapes(shape: sp.Shape) -> None:
    inv = sp.invoice(shape=shape, invoice_id="in_plan", subscription_id="sub_9", attempt_count=2)
    ev = parsed(sp.invoice_event("invoice.payment_failed", inv, created=T0, event_id="evt_1"))
    assert ev.object_kind == "invoice"
    assert ev.object_id == "in_plan"
    assert ev.subscription_id == "sub_9"
    assert ev.organization_id == "org_1"
    assert ev.billing_reason == "subscription_cycle"
    assert ev.invoice_kind == "plan"
    assert ev.failure_reason == "invoice in_plan payment failed (attempt 2)"
    assert ev.warnings == []


def test_old_shape_lists_no_unresolved_prices() -> None:
    ev = parsed(sp.invoice_event("invoice.payment_failed", sp.invoice(shape="old"), created=T0))
    assert ev.unresolved_price_ids == []


def test_new_shape_lists_price_ids_it_cannot_classify() -> None:
    inv = sp.invoice(shape="new", prices=[sp.price("price_a"), sp.price("price_b"), sp.price("price_a")])
    ev = parsed(sp.invoice_event("invoice.payment_failed", inv, created=T0))
    assert ev.invoice_kind == "plan"
    assert ev.unresolved_price_ids == ["price_a", "price_b"]


@pytest.mark.parametrize("shape", ["old", "new"])
def test_threshold_invoice_is_metered_in_both_shapes(shape: sp.Shape) -> None:
    inv = sp.invoice(shape=shape, billing_reason="subscription_threshold")
    ev = parsed(sp.invoice_event("invoice.payment_failed", inv, created=T0))
    assert ev.invoice_kind == "metered"
    assert ev.unresolved_price_ids == []


@pytest.mark.parametrize("metered_price", [METERED, WITH_METER], ids=["usage_type", "meter"])
@pytest.mark.parametrize("legacy", [False, True], ids=["price", "legacy_plan"])
def test_old_shape_metered_line(metered_price: dict, legacy: bool) -> None:
    inv = sp.invoice(shape="old", prices=[sp.price(), metered_price], legacy_plan=legacy)
    ev = parsed(sp.invoice_event("invoice.payment_failed", inv, created=T0))
    assert ev.invoice_kind == "metered"


@pytest.mark.parametrize("legacy", [False, True], ids=["price", "legacy_plan"])
def test_old_shape_licensed_lines_are_plan(legacy: bool) -> None:
    inv = sp.invoice(shape="old", prices=[sp.price(), sp.price("price_seat")], legacy_plan=legacy)
    assert parsed(sp.invoice_event("invoice.payment_failed", inv, created=T0)).invoice_kind == "plan"


def test_new_shape_with_expanded_price_is_classified_from_it() -> None:
    inv = sp.invoice(shape="new", prices=[sp.price(), METERED])
    for line in inv["lines"]["data"]:
        price_id = line["pricing"]["price_details"]["price"]
        line["pricing"]["price_details"]["price"] = METERED if price_id == METERED["id"] else sp.price()
    ev = parsed(sp.invoice_event("invoice.payment_failed", inv, created=T0))
    assert ev.invoice_kind == "metered"
    assert ev.unresolved_price_ids == []


def test_new_shape_subscription_from_parent_and_old_from_expanded_subscription() -> None:
    new = sp.invoice(shape="new", subscription_id="sub_new")
    assert parsed(sp.invoice_event("invoice.paid", new, created=T0)).subscription_id == "sub_new"
    old = sp.invoice(shape="old", subscription_id="sub_old")
    old["subscription"] = {"id": "sub_old", "object": "subscription"}
    assert parsed(sp.invoice_event("invoice.paid", old, created=T0)).subscription_id == "sub_old"


def test_invoice_without_subscription() -> None:
    inv = sp.invoice(shape="new", subscription_id=None, organization_id=None, billing_reason="manual")
    ev = parsed(sp.invoice_event("invoice.payment_failed", inv, created=T0))
    assert ev.subscription_id is None
    assert ev.organization_id is None


def test_failure_reason_includes_finalization_error() -> None:
    inv = sp.invoice(invoice_id="in_x", attempt_count=3, finalization_error="Your card was declined.")
    ev = parsed(sp.invoice_event("invoice.payment_failed", inv, created=T0))
    assert ev.failure_reason == "invoice in_x payment failed (attempt 3): Your card was declined."


def test_failure_reason_of_uncollectible_and_none_for_paid() -> None:
    inv = sp.invoice(invoice_id="in_u")
    uncollectible = parsed(sp.invoice_event("invoice.marked_uncollectible", inv, created=T0))
    assert uncollectible.failure_reason == "invoice in_u marked uncollectible"
    assert parsed(sp.invoice_event("invoice.paid", inv, created=T0)).failure_reason is None


# --------------------------------------------------------------------------------------------------
# Subscriptions


@pytest.mark.parametrize("shape", ["old", "new"])
def test_subscription_fields_both_shapes(shape: sp.Shape) -> None:
    sub = sp.subscription(
        shape=shape,
        subscription_id="sub_7",
        plan="team",
        downgrade_to="pro",
        cancel_at_period_end=True,
        current_period_end=1_765_000_000,
        metered_prices=[METERED],
        schedule_id="sub_sched_1",
    )
    ev = parsed(sp.subscription_event("customer.subscription.updated", sub, created=T0))
    assert ev.object_kind == "subscription"
    assert ev.object_id == ev.subscription_id == "sub_7"
    assert ev.organization_id == "org_1"
    assert ev.subscription_status == "active"
    assert ev.cancel_at_period_end is True
    assert ev.cancellation_scheduled is True
    assert ev.current_period_end == 1_765_000_000
    assert ev.metadata_plan == "team"
    assert ev.downgrade_to == "pro"
    assert ev.product_id == "prod_pro"  # the licensed item's product, not the usage product
    assert ev.product_plan is None  # product not expanded
    assert ev.schedule_id == "sub_sched_1"


def test_plan_item_is_the_licensed_one_even_when_listed_after_metered() -> None:
    sub = sp.subscription(plan_price=METERED, metered_prices=[sp.price(product="prod_team")])
    assert (
        parsed(sp.subscription_event("customer.subscription.created", sub, created=T0)).product_id
        == "prod_team"
    )


def test_legacy_plan_item_product() -> None:
    sub = sp.subscription(legacy_plan=True, plan=None)
    for item in sub["items"]["data"]:
        item["price"] = None
    ev = parsed(sp.subscription_event("customer.subscription.created", sub, created=T0))
    assert ev.product_id == "prod_pro"


def test_explicit_cancel_at_counts_as_scheduled_cancellation() -> None:
    sub = sp.subscription(cancel_at=1_765_000_000)
    ev = parsed(sp.subscription_event("customer.subscription.updated", sub, created=T0))
    assert ev.cancel_at_period_end is False
    assert ev.cancellation_scheduled is True


@pytest.mark.parametrize(
    ("product_obj", "expected"),
    [
        (sp.product(name="Anything", plan="team"), "team"),
        (sp.product(name="Acme Team (monthly)"), "team"),
        (sp.product(name="PRO plan"), "pro"),
        (sp.product(name="Starter"), None),
    ],
)
def test_expanded_product_gives_product_plan(product_obj: dict, expected: str | None) -> None:
    sub = sp.subscription(plan=None, plan_price=sp.price(product=product_obj))
    ev = parsed(sp.subscription_event("customer.subscription.updated", sub, created=T0))
    assert ev.product_id == product_obj["id"]
    assert ev.product_plan == expected


def test_unknown_plan_names_become_none_with_warnings() -> None:
    sub = sp.subscription(
        subscription_id="sub_w",
        plan="gold",
        downgrade_to="enterprise",
        plan_price=sp.price(product=sp.product(name="Team", plan="platinum")),
    )
    ev = parsed(sp.subscription_event("customer.subscription.updated", sub, created=T0))
    assert ev.metadata_plan is None
    assert ev.downgrade_to is None
    assert ev.product_plan == "team"  # invalid metadata plan ignored, the name still says team
    assert len(ev.warnings) == 3
    assert any("subscription sub_w metadata plan='gold'" in w for w in ev.warnings)
    assert any("downgrade_to='enterprise'" in w for w in ev.warnings)
    assert any("'platinum'" in w for w in ev.warnings)


def test_plan_names_are_case_sensitive() -> None:
    ev = parsed(
        sp.subscription_event("customer.subscription.updated", sp.subscription(plan="Pro"), created=T0)
    )
    assert ev.metadata_plan is None
    assert ev.warnings


# --------------------------------------------------------------------------------------------------
# Subscription schedules


def test_active_schedule_next_phase_plan() -> None:
    sched = sp.subscription_schedule(schedule_id="ss_1", subscription_id="sub_3", next_plan="team")
    ev = parsed(sp.schedule_event("subscription_schedule.updated", sched, created=T0))
    assert ev.object_kind == "subscription_schedule"
    assert ev.object_id == "ss_1"
    assert ev.subscription_id == "sub_3"
    assert ev.organization_id == "org_1"
    assert ev.schedule_active is True
    assert ev.schedule_next_plan == "team"


def test_schedule_in_its_last_phase_has_no_next_plan() -> None:
    ev = parsed(
        sp.schedule_event(
            "subscription_schedule.updated", sp.subscription_schedule(next_plan=None), created=T0
        )
    )
    assert ev.schedule_active is True
    assert ev.schedule_next_plan is None


def test_not_started_schedule_next_plan_is_its_first_phase() -> None:
    sched = sp.subscription_schedule(status="not_started", current_plan="team", next_plan="pro")
    ev = parsed(sp.schedule_event("subscription_schedule.created", sched, created=T0))
    assert ev.schedule_active is True
    assert ev.schedule_next_plan == "team"


@pytest.mark.parametrize("status", ["completed", "canceled", "released"])
def test_ended_schedules_are_not_active(status: str) -> None:
    sched = sp.subscription_schedule(status=status)
    ev = parsed(sp.schedule_event(f"subscription_schedule.{status}", sched, created=T0))
    assert ev.schedule_active is False
    assert ev.schedule_next_plan is None


def test_schedule_next_plan_validated() -> None:
    sched = sp.subscription_schedule(next_plan="business")
    ev = parsed(sp.schedule_event("subscription_schedule.updated", sched, created=T0))
    assert ev.schedule_next_plan is None
    assert ev.warnings == [
        "subscription schedule sub_sched_test_1 next phase metadata plan='business' "
        "is not one of free, pro, team; ignored"
    ]


# --------------------------------------------------------------------------------------------------
# Helpers used by activities


def test_price_is_metered() -> None:
    assert price_is_metered(METERED)
    assert price_is_metered(WITH_METER)
    assert not price_is_metered(sp.price())
    assert price_is_metered(sp.legacy_plan(metered=True))
    assert not price_is_metered(sp.legacy_plan())


def test_plan_from_product_prefers_metadata() -> None:
    warnings: list[str] = []
    assert plan_from_product(sp.product(name="Team", plan="pro"), warnings) == "pro"
    assert plan_from_product(sp.product(name="Free tier"), warnings) is None
    assert warnings == []
