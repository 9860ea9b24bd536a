"""Unit tests of the pure payment state machine (`billing.domain.payment_state`), fed with parsed payloads."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Iterable
from typing import Any

import pytest

from billing.domain.payment_state import (
    MAX_SEEN_EVENT_IDS,
    PaymentState,
    RecomputeQuota,
    ResolveInvoiceKind,
    ResolvePlan,
    RevokeDowngrade,
    ScheduleDowngrade,
    Transition,
    apply_event,
    apply_operator,
    apply_resolved_invoice_kind,
    apply_resolved_plan,
    record_stripe_refusal,
)
from billing.domain.stripe_events import BillingEvent, parse_event
from billing.testing import stripe_payloads as sp

T0 = 1_761_000_000
METERED = sp.price("price_tasks", product="prod_usage", metered=True)


# --------------------------------------------------------------------------------------------------
# Helpers


def parsed(raw: dict[str, Any]) -> BillingEvent:
    event = parse_event(raw)
    assert event is not None
    return event


def metered_invoice(invoice_id: str, *, shape: sp.Shape = "old", **kwargs: Any) -> dict[str, Any]:
    return sp.invoice(shape=shape, invoice_id=invoice_id, prices=[sp.price(), METERED], **kwargs)


def plan_invoice(invoice_id: str, *, shape: sp.Shape = "old", **kwargs: Any) -> dict[str, Any]:
    return sp.invoice(shape=shape, invoice_id=invoice_id, **kwargs)


def inv_event(
    event_type: str, inv: dict[str, Any], created: int, event_id: str | None = None
) -> BillingEvent:
    return parsed(sp.invoice_event(event_type, inv, created=created, event_id=event_id))


def sub_event(event_type: str, created: int, event_id: str | None = None, **kwargs: Any) -> BillingEvent:
    return parsed(
        sp.subscription_event(event_type, sp.subscription(**kwargs), created=created, event_id=event_id)
    )


def sched_event(event_type: str, created: int, **kwargs: Any) -> BillingEvent:
    return parsed(sp.schedule_event(event_type, sp.subscription_schedule(**kwargs), created=created))


def apply_all(state: PaymentState, events: Iterable[BillingEvent]) -> PaymentState:
    for event in events:
        state = apply_event(state, event).state
    return state


def pro_state(**kwargs: Any) -> PaymentState:
    """An org on `pro` with subscription sub_test_1, as after its subscription was created."""
    defaults: dict[str, Any] = {"plan": "pro", "subscription_id": "sub_test_1", "period_end": 1_762_600_000}
    return PaymentState(**(defaults | kwargs))


def business_view(state: PaymentState) -> dict[str, Any]:
    """The state without the order-dependent logs, for convergence checks."""
    view = state.model_dump(exclude={"seen_event_ids", "recent_events"})
    view["seen_event_ids"] = sorted(state.seen_event_ids)
    return view


def effect_kinds(transition: Transition) -> list[str]:
    return [effect.kind for effect in transition.effects]


# --------------------------------------------------------------------------------------------------
# Invoices: failures and payments


@pytest.mark.parametrize("shape", ["old", "new"])
def test_failed_metered_invoice_blocks(shape: sp.Shape) -> None:
    inv = (
        metered_invoice("in_m", shape=shape)
        if shape == "old"
        else sp.invoice(shape="new", invoice_id="in_m", billing_reason="subscription_threshold")
    )
    t = apply_event(pro_state(), inv_event("invoice.payment_failed", inv, T0, "evt_f"))
    assert t.outcome == "applied"
    assert t.state.payment_status == "blocked"
    assert list(t.state.failed_metered) == ["in_m"]
    assert t.state.failed_metered["in_m"].event_id == "evt_f"
    assert t.state.failed_metered["in_m"].created == T0
    assert t.state.failed_plan == {}
    assert t.state.pending_plan is None  # a metered failure does not downgrade
    assert t.effects == [
        RecomputeQuota(reason="blocked"),
    ]  # fmt: skip


@pytest.mark.parametrize("shape", ["old", "new"])
def test_failed_plan_invoice_is_past_due_and_schedules_downgrade(shape: sp.Shape) -> None:
    inv = plan_invoice("in_p", shape=shape, subscription_id="sub_test_1")
    if shape == "new":  # make the kind known from the payload itself
        for line in inv["lines"]["data"]:
            line["pricing"]["price_details"]["price"] = sp.price()
    t = apply_event(pro_state(), inv_event("invoice.payment_failed", inv, T0, "evt_pf"))
    assert t.state.payment_status == "past_due"
    assert list(t.state.failed_plan) == ["in_p"]
    assert t.state.pending_plan == "free"
    assert t.state.plan == "pro"  # the downgrade happens at period end
    assert t.state.downgrade_scheduled_for == "sub_test_1"
    assert t.effects == [
        ScheduleDowngrade(
            subscription_id="sub_test_1", downgrade_to="free", downgrade_reason="plan_payment_failed",
            idempotency_key="downgrade:evt_pf",
        ),
    ]  # fmt: skip


def test_repeated_plan_failures_of_one_invoice_schedule_one_downgrade() -> None:
    inv = plan_invoice("in_p")
    first = apply_event(pro_state(), inv_event("invoice.payment_failed", inv, T0))
    retry = {**inv, "attempt_count": 2}
    second = apply_event(first.state, inv_event("invoice.payment_failed", retry, T0 + 3600))
    assert second.outcome == "applied"
    assert second.effects == []
    assert second.state.failed_plan["in_p"].reason == "invoice in_p payment failed (attempt 2)"
    assert second.state.failed_plan["in_p"].created == T0 + 3600


def test_plan_failure_without_subscription_warns_and_schedules_nothing() -> None:
    inv = plan_invoice("in_manual", subscription_id=None, billing_reason="manual")
    t = apply_event(PaymentState(), inv_event("invoice.payment_failed", inv, T0))
    assert t.state.payment_status == "past_due"
    assert "schedule_downgrade" not in effect_kinds(t)
    assert t.warnings == ["plan invoice in_manual failed but has no subscription: no downgrade scheduled"]


@pytest.mark.parametrize("paid_type", ["invoice.paid", "invoice.payment_succeeded"])
def test_paid_metered_invoice_lifts_block(paid_type: str) -> None:
    inv = metered_invoice("in_m")
    blocked = apply_event(pro_state(), inv_event("invoice.payment_failed", inv, T0)).state
    t = apply_event(blocked, inv_event(paid_type, inv, T0 + 60))
    assert t.outcome == "applied"
    assert t.state.payment_status == "ok"
    assert t.state.failed_metered == {}
    assert effect_kinds(t) == ["recompute_quota"]
    assert t.effects[0] == RecomputeQuota(reason="unblocked")


def test_paid_plan_invoice_lifts_past_due_and_revokes_the_downgrade() -> None:
    inv = plan_invoice("in_p")
    past_due = apply_event(pro_state(), inv_event("invoice.payment_failed", inv, T0)).state
    t = apply_event(past_due, inv_event("invoice.paid", inv, T0 + 60, "evt_paid"))
    assert t.state.payment_status == "ok"
    assert t.state.pending_plan is None
    assert t.state.downgrade_scheduled_for is None
    assert t.effects == [
        RevokeDowngrade(subscription_id="sub_test_1", idempotency_key="revoke-downgrade:evt_paid"),
    ]  # fmt: skip
    # invoice.payment_succeeded for the same payment right after: nothing more to do.
    again = apply_event(t.state, inv_event("invoice.payment_succeeded", inv, T0 + 60))
    assert again.outcome == "applied"
    assert again.effects == []


def test_paid_invoice_clears_only_its_own_failure() -> None:
    state = apply_all(
        pro_state(),
        [
            inv_event("invoice.payment_failed", plan_invoice("in_p1"), T0),
            inv_event("invoice.payment_failed", plan_invoice("in_p2"), T0 + 1),
        ],
    )
    t = apply_event(state, inv_event("invoice.paid", plan_invoice("in_p1"), T0 + 2))
    assert t.state.payment_status == "past_due"
    assert list(t.state.failed_plan) == ["in_p2"]
    assert t.state.pending_plan == "free"  # a plan failure is still open
    assert t.effects == []  # no column changed, and the downgrade stands
    unrelated = apply_event(t.state, inv_event("invoice.paid", plan_invoice("in_other"), T0 + 3))
    assert unrelated.state.failed_plan.keys() == {"in_p2"}


def test_metered_fails_plan_fails_plan_paid_still_blocked() -> None:
    state = apply_all(
        pro_state(),
        [
            inv_event("invoice.payment_failed", metered_invoice("in_m"), T0),
            inv_event("invoice.payment_failed", plan_invoice("in_p"), T0 + 10),
            inv_event("invoice.paid", plan_invoice("in_p"), T0 + 20),
        ],
    )
    assert state.payment_status == "blocked"
    assert list(state.failed_metered) == ["in_m"]
    assert state.failed_plan == {}
    assert state.pending_plan is None


def test_metered_fails_plan_fails_metered_paid_leaves_past_due() -> None:
    state = apply_all(
        pro_state(),
        [
            inv_event("invoice.payment_failed", metered_invoice("in_m"), T0),
            inv_event("invoice.payment_failed", plan_invoice("in_p"), T0 + 10),
        ],
    )
    assert state.payment_status == "blocked"
    t = apply_event(state, inv_event("invoice.paid", metered_invoice("in_m"), T0 + 20))
    assert t.state.payment_status == "past_due"
    assert t.state.failed_metered == {}
    assert list(t.state.failed_plan) == ["in_p"]
    assert t.state.pending_plan == "free"
    assert effect_kinds(t) == ["recompute_quota"]  # no RevokeDowngrade


def test_later_plan_failure_does_not_lift_metered_block() -> None:
    state = apply_all(
        pro_state(),
        [
            inv_event("invoice.payment_failed", metered_invoice("in_m"), T0),
            inv_event("invoice.payment_failed", plan_invoice("in_p"), T0 + 10),
        ],
    )
    assert state.payment_status == "blocked"
    assert set(state.failed_metered) == {"in_m"}
    assert set(state.failed_plan) == {"in_p"}


def test_voided_invoice_clears_its_failure() -> None:
    inv = metered_invoice("in_m")
    blocked = apply_event(pro_state(), inv_event("invoice.payment_failed", inv, T0)).state
    t = apply_event(blocked, inv_event("invoice.voided", inv, T0 + 60))
    assert t.state.payment_status == "ok"


def test_marked_uncollectible_keeps_failure_open() -> None:
    inv = metered_invoice("in_m")
    blocked = apply_event(pro_state(), inv_event("invoice.payment_failed", inv, T0)).state
    t = apply_event(blocked, inv_event("invoice.marked_uncollectible", inv, T0 + 60))
    assert t.state.payment_status == "blocked"
    assert t.state.failed_metered["in_m"].reason == "invoice in_m marked uncollectible"


def test_marked_uncollectible_without_prior_failure_opens_one() -> None:
    t = apply_event(pro_state(), inv_event("invoice.marked_uncollectible", plan_invoice("in_p"), T0, "evt_u"))
    assert t.state.payment_status == "past_due"
    assert t.state.pending_plan == "free"
    assert ScheduleDowngrade(subscription_id="sub_test_1", idempotency_key="downgrade:evt_u") in t.effects


# --------------------------------------------------------------------------------------------------
# Newer invoice shape: the kind of a failed invoice is looked up first


def test_new_shape_failure_asks_for_invoice_kind_then_blocks() -> None:
    inv = sp.invoice(shape="new", invoice_id="in_n", prices=[sp.price(), METERED])
    event = inv_event("invoice.payment_failed", inv, T0, "evt_n")
    t = apply_event(pro_state(), event)
    assert t.outcome == "applied"
    assert t.state.payment_status == "ok"  # not known yet
    assert t.effects == [
        ResolveInvoiceKind(
            invoice_id="in_n", price_ids=["price_pro_monthly", "price_tasks"], event_id="evt_n"
        )
    ]
    resolved = apply_resolved_invoice_kind(t.state, event, "metered")
    assert resolved.outcome == "applied"
    assert resolved.state.payment_status == "blocked"
    assert effect_kinds(resolved) == ["recompute_quota"]


def test_new_shape_failure_resolved_as_plan_schedules_downgrade() -> None:
    inv = sp.invoice(shape="new", invoice_id="in_n")
    event = inv_event("invoice.payment_failed", inv, T0, "evt_n")
    state = apply_event(pro_state(), event).state
    resolved = apply_resolved_invoice_kind(state, event, "plan")
    assert resolved.state.payment_status == "past_due"
    assert (
        ScheduleDowngrade(subscription_id="sub_test_1", idempotency_key="downgrade:evt_n") in resolved.effects
    )


def test_invoice_kind_resolution_is_stale_after_a_newer_payment() -> None:
    inv = sp.invoice(shape="new", invoice_id="in_n")
    failed = inv_event("invoice.payment_failed", inv, T0)
    state = apply_all(pro_state(), [failed, inv_event("invoice.paid", inv, T0 + 5)])
    t = apply_resolved_invoice_kind(state, failed, "metered")
    assert t.outcome == "stale"
    assert t.state is state


# --------------------------------------------------------------------------------------------------
# Duplicates and ordering


def all_kinds_of_events() -> list[BillingEvent]:
    return [
        inv_event("invoice.payment_failed", metered_invoice("in_m"), T0),
        inv_event("invoice.payment_failed", plan_invoice("in_p"), T0),
        inv_event("invoice.paid", plan_invoice("in_p"), T0 + 5),
        inv_event("invoice.voided", metered_invoice("in_m"), T0 + 5),
        inv_event("invoice.marked_uncollectible", plan_invoice("in_u"), T0),
        sub_event("customer.subscription.created", T0, plan="team"),
        sub_event("customer.subscription.updated", T0, plan=None),  # ResolvePlan
        sub_event("customer.subscription.updated", T0, cancel_at_period_end=True),
        sub_event("customer.subscription.deleted", T0, status="canceled"),
        sched_event("subscription_schedule.updated", T0, next_plan="team"),
        sched_event("subscription_schedule.released", T0, status="released"),
    ]


@pytest.mark.parametrize("event", all_kinds_of_events(), ids=lambda e: e.type)
def test_each_event_applied_three_times_counts_once(event: BillingEvent) -> None:
    once = apply_event(pro_state(), event)
    twice = apply_event(once.state, event)
    thrice = apply_event(twice.state, event)
    assert (twice.outcome, thrice.outcome) == ("duplicate", "duplicate")
    assert twice.effects == thrice.effects == []
    assert thrice.state == once.state
    assert business_view(thrice.state) == business_view(once.state)


def test_success_before_older_failure_of_same_invoice_ends_ok() -> None:
    inv = plan_invoice("in_p")
    paid = apply_event(pro_state(), inv_event("invoice.paid", inv, T0 + 100))
    t = apply_event(paid.state, inv_event("invoice.payment_failed", inv, T0))
    assert t.outcome == "stale"
    assert t.effects == []
    assert t.state.payment_status == "ok"
    assert t.state.failed_plan == {}
    assert t.state.pending_plan is None
    assert business_view(t.state) | {"seen_event_ids": []} == business_view(paid.state) | {
        "seen_event_ids": []
    }
    assert t.state.recent_events[-1].outcome == "stale"


def test_newer_failure_after_payment_reopens() -> None:
    # Staleness compares with the invoice's last applied event: only a strictly newer failure reopens.
    inv = metered_invoice("in_m")
    state = apply_all(
        pro_state(),
        [inv_event("invoice.payment_failed", inv, T0), inv_event("invoice.paid", inv, T0 + 10)],
    )
    t = apply_event(state, inv_event("invoice.payment_failed", inv, T0 + 20))
    assert t.state.payment_status == "blocked"


def test_same_second_events_of_one_object_both_apply() -> None:
    inv = metered_invoice("in_m")
    state = apply_all(
        pro_state(),
        [inv_event("invoice.payment_failed", inv, T0), inv_event("invoice.paid", inv, T0)],
    )
    assert state.payment_status == "ok"


def test_stale_subscription_update_changes_nothing() -> None:
    newer = sub_event("customer.subscription.updated", T0 + 10, plan="team", current_period_end=1_765_000_000)
    older = sub_event("customer.subscription.updated", T0, plan="pro", current_period_end=1_762_600_000)
    state = apply_event(PaymentState(), newer).state
    t = apply_event(state, older)
    assert t.outcome == "stale"
    assert (t.state.plan, t.state.period_end) == ("team", 1_765_000_000)


def test_seen_event_ids_are_bounded() -> None:
    state = PaymentState()
    for i in range(MAX_SEEN_EVENT_IDS + 5):
        state = apply_event(
            state, inv_event("invoice.paid", plan_invoice(f"in_{i}"), T0 + i, f"evt_{i}")
        ).state
    assert len(state.seen_event_ids) == MAX_SEEN_EVENT_IDS
    assert state.seen_event_ids[0] == "evt_5"
    assert len(state.recent_events) == 50


def convergence_events() -> list[BillingEvent]:
    """Events for distinct invoices, plus same-invoice chains whose order `created` decides."""
    return [
        inv_event("invoice.payment_failed", metered_invoice("in_a"), T0 + 1),
        inv_event("invoice.payment_failed", plan_invoice("in_b"), T0 + 2),
        inv_event("invoice.payment_failed", plan_invoice("in_c"), T0 + 3),
        inv_event("invoice.paid", plan_invoice("in_c"), T0 + 4),
        inv_event("invoice.payment_failed", metered_invoice("in_d"), T0 + 5),
        inv_event("invoice.payment_succeeded", metered_invoice("in_d"), T0 + 6),
        inv_event("invoice.payment_failed", {**plan_invoice("in_e"), "attempt_count": 1}, T0 + 7),
        inv_event("invoice.paid", plan_invoice("in_e"), T0 + 8),
        inv_event("invoice.payment_failed", {**plan_invoice("in_e"), "attempt_count": 2}, T0 + 9),
        inv_event("invoice.marked_uncollectible", metered_invoice("in_f"), T0 + 10),
        inv_event("invoice.payment_failed", metered_invoice("in_g"), T0 + 11),
        inv_event("invoice.voided", metered_invoice("in_g"), T0 + 12),
    ]


def test_every_order_of_six_invoice_events_converges() -> None:
    events = convergence_events()[:6]
    finals = {json.dumps(business_view(apply_all(pro_state(), order)), sort_keys=True)
              for order in itertools.permutations(events)}  # fmt: skip
    assert len(finals) == 1
    final = PaymentState.model_validate(json.loads(finals.pop()))
    assert final.payment_status == "blocked"
    assert set(final.failed_metered) == {"in_a"}
    assert set(final.failed_plan) == {"in_b"}


def test_many_random_orders_converge_to_the_in_order_state() -> None:
    events = convergence_events()
    expected = business_view(apply_all(pro_state(), events))
    rng = random.Random(20_251_128)
    for _ in range(500):
        order = events[:]
        rng.shuffle(order)
        assert business_view(apply_all(pro_state(), order)) == expected
    assert expected["failed_metered"].keys() == {"in_a", "in_f"}
    assert expected["failed_plan"].keys() == {"in_b", "in_e"}
    assert expected["failed_plan"]["in_e"]["reason"] == "invoice in_e payment failed (attempt 2)"
    assert expected["payment_status"] == "blocked"
    assert expected["pending_plan"] == "free"


def test_random_orders_of_one_subscriptions_events_converge() -> None:
    events = [
        sub_event("customer.subscription.created", T0, plan="pro", status="incomplete"),
        sub_event("customer.subscription.updated", T0 + 1, plan="pro"),
        sub_event("customer.subscription.updated", T0 + 2, plan="team", current_period_end=1_765_000_000),
        sub_event("customer.subscription.updated", T0 + 3, plan="team", cancel_at_period_end=True,
                  downgrade_to="pro", current_period_end=1_765_000_000),
    ]  # fmt: skip
    expected = business_view(apply_all(PaymentState(), events))
    rng = random.Random(7)
    for _ in range(100):
        order = events[:]
        rng.shuffle(order)
        assert business_view(apply_all(PaymentState(), order)) == expected
    assert (expected["plan"], expected["pending_plan"], expected["period_end"]) == (
        "team",
        "pro",
        1_765_000_000,
    )


# --------------------------------------------------------------------------------------------------
# Subscriptions


@pytest.mark.parametrize("status", ["active", "trialing"])
@pytest.mark.parametrize("event_type", ["customer.subscription.created", "customer.subscription.updated"])
@pytest.mark.parametrize("shape", ["old", "new"])
def test_active_subscription_sets_plan_id_period_and_clears_pending(
    status: str, event_type: str, shape: sp.Shape
) -> None:
    start = PaymentState(plan="free", pending_plan="pro", pending_plan_source="cancellation")
    t = apply_event(
        start,
        sub_event(event_type, T0, shape=shape, status=status, subscription_id="sub_9", plan="team",
                  current_period_end=1_765_000_000),
    )  # fmt: skip
    assert t.outcome == "applied"
    assert (t.state.plan, t.state.subscription_id, t.state.period_end) == ("team", "sub_9", 1_765_000_000)
    assert t.state.pending_plan is None
    assert t.effects == [
        RecomputeQuota(reason="plan free -> team"),
    ]  # fmt: skip


def test_plan_from_expanded_product_metadata_or_name() -> None:
    for product, plan in [
        (sp.product(plan="team", name="X"), "team"),
        (sp.product(name="Pro Monthly"), "pro"),
    ]:
        event = sub_event(
            "customer.subscription.updated", T0, plan=None, plan_price=sp.price(product=product)
        )
        t = apply_event(PaymentState(), event)
        assert t.state.plan == plan
        assert "resolve_plan" not in effect_kinds(t)


def test_plan_resolved_from_stripe_product() -> None:
    event = sub_event("customer.subscription.updated", T0, "evt_s", plan=None, subscription_id="sub_9")
    t = apply_event(PaymentState(), event)
    assert t.state.plan == "free"  # unchanged until resolved
    assert t.state.subscription_id == "sub_9"
    assert ResolvePlan(product_id="prod_pro", subscription_id="sub_9", event_id="evt_s") in t.effects
    resolved = apply_resolved_plan(t.state, event, "pro")
    assert resolved.outcome == "applied"
    assert resolved.state.plan == "pro"
    assert resolved.state.awaiting_plan_event_id is None
    assert effect_kinds(resolved) == ["recompute_quota"]
    assert apply_resolved_plan(resolved.state, event, "pro").outcome == "stale"  # only once


def test_plan_resolution_superseded_by_newer_subscription_event_is_stale() -> None:
    first = sub_event("customer.subscription.updated", T0, plan=None)
    state = apply_all(
        PaymentState(), [first, sub_event("customer.subscription.updated", T0 + 5, plan="team")]
    )
    t = apply_resolved_plan(state, first, "pro")
    assert t.outcome == "stale"
    assert t.state.plan == "team"


def test_unknown_resolved_plan_is_ignored_with_warning() -> None:
    event = sub_event("customer.subscription.updated", T0, plan=None)
    state = apply_event(pro_state(), event).state
    t = apply_resolved_plan(state, event, "gold")
    assert t.outcome.startswith("ignored: ")
    assert t.state.plan == "pro"
    assert any("'gold'" in w for w in t.warnings)
    assert apply_resolved_plan(state, event, None).state.plan == "pro"


def test_unknown_metadata_plan_is_ignored_with_warning_and_falls_back_to_product() -> None:
    event = sub_event("customer.subscription.updated", T0, "evt_g", plan="gold", downgrade_to="platinum",
                      cancel_at_period_end=True)  # fmt: skip
    t = apply_event(pro_state(), event)
    assert t.state.plan == "pro"
    assert t.state.pending_plan == "free"  # invalid downgrade_to -> default free
    assert any("plan='gold'" in w for w in t.warnings)
    assert any("downgrade_to='platinum'" in w for w in t.warnings)
    assert ResolvePlan(product_id="prod_pro", subscription_id="sub_test_1", event_id="evt_g") in t.effects


@pytest.mark.parametrize(("downgrade_to", "pending"), [("pro", "pro"), (None, "free")])
def test_scheduled_cancellation_sets_pending_plan(downgrade_to: str | None, pending: str) -> None:
    event = sub_event("customer.subscription.updated", T0, plan="team", cancel_at_period_end=True,
                      downgrade_to=downgrade_to, current_period_end=1_765_000_000)  # fmt: skip
    t = apply_event(PaymentState(), event)
    assert (t.state.plan, t.state.pending_plan) == ("team", pending)
    assert (t.state.subscription_id, t.state.period_end) == ("sub_test_1", 1_765_000_000)


@pytest.mark.parametrize(
    ("event_type", "status"),
    [
        ("customer.subscription.deleted", "canceled"),
        ("customer.subscription.updated", "canceled"),
        ("customer.subscription.updated", "unpaid"),
        ("customer.subscription.updated", "incomplete_expired"),
    ],
)
@pytest.mark.parametrize(("downgrade_to", "plan"), [("pro", "pro"), (None, "free")])
def test_terminal_subscription_resets_plan(
    event_type: str, status: str, downgrade_to: str | None, plan: str
) -> None:
    start = pro_state(plan="team", pending_plan="pro", pending_plan_source="cancellation")
    t = apply_event(start, sub_event(event_type, T0, status=status, plan="team", downgrade_to=downgrade_to))
    assert t.outcome == "applied"
    assert t.state.plan == plan
    assert t.state.pending_plan is None
    assert t.state.subscription_id is None
    assert t.state.period_end is None
    assert "recompute_quota" in effect_kinds(t)


def test_terminal_event_of_an_old_subscription_is_ignored() -> None:
    start = pro_state(subscription_id="sub_new")
    t = apply_event(
        start, sub_event("customer.subscription.deleted", T0, status="canceled", subscription_id="sub_old")
    )
    assert t.outcome == "ignored: sub_old is not the current subscription sub_new"
    assert (t.state.plan, t.state.subscription_id) == ("pro", "sub_new")
    assert t.effects == []


@pytest.mark.parametrize("status", ["incomplete", "past_due", "paused"])
def test_other_subscription_statuses_are_ignored(status: str) -> None:
    t = apply_event(pro_state(), sub_event("customer.subscription.updated", T0, status=status, plan="team"))
    assert t.outcome == f"ignored: subscription status {status}"
    assert t.state.plan == "pro"
    assert t.effects == []


def test_subscription_update_keeps_pending_free_while_plan_failure_open() -> None:
    state = apply_event(pro_state(), inv_event("invoice.payment_failed", plan_invoice("in_p"), T0)).state
    t = apply_event(state, sub_event("customer.subscription.updated", T0 + 1, plan="pro"))
    assert t.state.pending_plan == "free"
    # Stripe confirms our downgrade, then the customer pays: pending waits for the revocation's update.
    state = apply_all(
        t.state,
        [
            sub_event("customer.subscription.updated", T0 + 2, plan="pro", cancel_at_period_end=True,
                      downgrade_to="free"),
            inv_event("invoice.paid", plan_invoice("in_p"), T0 + 3),
        ],
    )  # fmt: skip
    assert (state.payment_status, state.pending_plan) == ("ok", "free")
    state = apply_event(state, sub_event("customer.subscription.updated", T0 + 4, plan="pro")).state
    assert state.pending_plan is None


# --------------------------------------------------------------------------------------------------
# Subscription schedules


@pytest.mark.parametrize("event_type", ["subscription_schedule.created", "subscription_schedule.updated"])
def test_schedule_with_next_phase_sets_pending_plan(event_type: str) -> None:
    t = apply_event(pro_state(), sched_event(event_type, T0, next_plan="team"))
    assert t.outcome == "applied"
    assert (t.state.pending_plan, t.state.pending_plan_source) == ("team", "schedule")
    assert effect_kinds(t) == []


@pytest.mark.parametrize("ending", ["completed", "canceled", "released"])
def test_ended_schedule_clears_pending_plan(ending: str) -> None:
    state = apply_event(pro_state(), sched_event("subscription_schedule.updated", T0, next_plan="team")).state
    t = apply_event(state, sched_event(f"subscription_schedule.{ending}", T0 + 5, status=ending))
    assert t.outcome == "applied"
    assert t.state.pending_plan is None


def test_schedule_pending_plan_survives_subscription_updates_while_attached() -> None:
    state = apply_event(pro_state(), sched_event("subscription_schedule.created", T0, next_plan="team")).state
    kept = apply_event(
        state, sub_event("customer.subscription.updated", T0 + 1, schedule_id="sub_sched_test_1")
    )
    assert kept.state.pending_plan == "team"
    dropped = apply_event(kept.state, sub_event("customer.subscription.updated", T0 + 2, schedule_id=None))
    assert dropped.state.pending_plan is None


def test_schedule_does_not_touch_a_pending_cancellation() -> None:
    state = apply_event(
        pro_state(),
        sub_event("customer.subscription.updated", T0, cancel_at_period_end=True, downgrade_to="free"),
    ).state
    for event in [
        sched_event("subscription_schedule.updated", T0 + 1, next_plan="team"),
        sched_event("subscription_schedule.released", T0 + 2, status="released"),
    ]:
        t = apply_event(state, event)
        # Recorded (whatever the order, the schedule's phase counts once the cancellation is undone),
        # but the cancellation outranks it.
        assert t.outcome == "applied"
        assert (t.state.pending_plan, t.state.pending_plan_source) == ("free", "cancellation")


def test_schedule_of_another_subscription_is_ignored() -> None:
    t = apply_event(
        pro_state(), sched_event("subscription_schedule.updated", T0, subscription_id="sub_other")
    )
    assert t.outcome.startswith("ignored: schedule for sub_other")
    assert t.state.pending_plan is None


# --------------------------------------------------------------------------------------------------
# Operator overrides and Stripe refusals


def test_operator_block_forces_blocked_until_unblock() -> None:
    t = apply_operator(pro_state(), "block", "fraud review", at=T0)
    assert t.state.payment_status == "blocked"
    assert t.state.status_reasons == ["blocked by operator: fraud review"]
    assert effect_kinds(t) == ["recompute_quota"]
    # A paid invoice does not lift an operator block.
    state = apply_event(t.state, inv_event("invoice.paid", plan_invoice("in_p"), T0 + 1)).state
    assert state.payment_status == "blocked"
    u = apply_operator(state, "unblock", "review done", at=T0 + 2)
    assert u.state.payment_status == "ok"
    assert u.state.operator_block is None
    assert [a.action for a in u.state.operator_actions] == ["block", "unblock"]


def test_operator_unblock_closes_metered_failures_but_not_plan_failures() -> None:
    state = apply_all(
        pro_state(),
        [
            inv_event("invoice.payment_failed", metered_invoice("in_m1"), T0),
            inv_event("invoice.payment_failed", metered_invoice("in_m2"), T0 + 1),
            inv_event("invoice.payment_failed", plan_invoice("in_p"), T0 + 2),
        ],
    )
    t = apply_operator(state, "unblock", "customer promised to pay by Friday", at=T0 + 3)
    assert t.state.failed_metered == {}
    assert set(t.state.failed_plan) == {"in_p"}
    assert t.state.payment_status == "past_due"
    assert t.state.operator_actions[-1].note == "closed metered failures of in_m1, in_m2"
    assert t.state.operator_actions[-1].reason == "customer promised to pay by Friday"
    assert t.effects[-1] == RecomputeQuota(reason="unblocked")
    # A later failure of the same invoice (Stripe's next retry) is new information: blocked again.
    again = apply_event(t.state, inv_event("invoice.payment_failed", metered_invoice("in_m1"), T0 + 100))
    assert again.state.payment_status == "blocked"


def test_operator_action_validation() -> None:
    with pytest.raises(ValueError, match="unknown operator action"):
        apply_operator(PaymentState(), "delete", "x", at=T0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a reason"):
        apply_operator(PaymentState(), "block", "  ", at=T0)


def test_stripe_refusal_is_recorded_and_shown() -> None:
    t = apply_event(pro_state(), inv_event("invoice.payment_failed", plan_invoice("in_p"), T0))
    downgrade = next(e for e in t.effects if isinstance(e, ScheduleDowngrade))
    r = record_stripe_refusal(t.state, downgrade, "No such subscription: 'sub_test_1'", at=T0 + 1)
    assert r.outcome == "applied"
    assert r.effects == []
    assert r.state.downgrade_errors[-1].message == "No such subscription: 'sub_test_1'"
    assert r.state.downgrade_scheduled_for is None
    assert r.state.payment_status == "past_due"
    assert (
        r.state.status_reasons[-1]
        == "Stripe refused downgrade of sub_test_1: No such subscription: 'sub_test_1'"
    )
    assert r.warnings


# --------------------------------------------------------------------------------------------------
# Serialisation: the state crosses continue-as-new and the `state` query as JSON


def test_state_round_trips_through_json() -> None:
    state = apply_all(pro_state(), all_kinds_of_events())
    state = apply_operator(state, "block", "manual", at=T0 + 50).state
    dumped = json.loads(state.model_dump_json())
    assert dumped["payment_status"] == "blocked"
    assert PaymentState.model_validate(dumped) == state


def test_apply_event_does_not_mutate_its_input() -> None:
    state = pro_state()
    before = state.model_dump()
    for event in all_kinds_of_events():
        apply_event(state, event)
    assert state.model_dump() == before


def test_reducer_imports_inside_the_workflow_sandbox() -> None:
    """The sandbox re-imports the workflow module with its restrictions; a forbidden import would raise."""
    from temporalio import workflow
    from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

    from tests.sandbox_probe_workflow import PaymentReducerProbeWorkflow

    async def prepare() -> None:  # the runner needs a running event loop
        definition = workflow._Definition.must_from_class(PaymentReducerProbeWorkflow)
        SandboxedWorkflowRunner().prepare_workflow(definition)

    asyncio.run(prepare())
