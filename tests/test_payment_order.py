"""Subscription order does not matter (issue 11, finding 5): the pure reducer, fed lifecycles of
subscriptions and invoices in every order and with duplicates, ends where in-order delivery ends."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.domain.payment_state import PaymentState, apply_event
from billing.domain.plans import PLANS
from billing.domain.stripe_events import BillingEvent, parse_event
from billing.testing import stripe_payloads as sp

T0 = 1_761_000_000
METERED = sp.price("price_tasks", product="prod_usage", metered=True)



def parsed(raw: dict[str, Any]) -> BillingEvent:
    event = parse_event(raw)
    assert event is not None
    return event


def deliver(events: list[BillingEvent], state: PaymentState | None = None) -> PaymentState:
    state = state or PaymentState()
    for event in events:
        state = apply_event(state, event).state
    return state


def observable(state: PaymentState) -> dict[str, Any]:
    """What the org's billing row, flags and `billing status` show: not the order-dependent logs."""
    return {
        "plan": state.plan,
        "pending_plan": state.pending_plan,
        "period_end": state.period_end,
        "subscription_id": state.subscription_id,
        "payment_status": state.payment_status,
        "failed_metered": sorted(state.failed_metered),
        "failed_plan": sorted(state.failed_plan),
        "stripe_customer_id": state.stripe_customer_id,
    }


def sub(event_type: str, created: int, subscription_id: str, **kwargs: Any) -> BillingEvent:
    payload = sp.subscription(subscription_id=subscription_id, **kwargs)
    return parsed(sp.subscription_event(event_type, payload, created=created, event_id=f"evt_{created}"))


# --------------------------------------------------------------------------------------------------
# The case, by hand: sub_1 updated to pro (E1), sub_1 deleted (E2), sub_2 created on team (E3).


def upgrade_events() -> tuple[BillingEvent, BillingEvent, BillingEvent]:
    e1 = sub("customer.subscription.updated", T0 + 1, "sub_1", plan="pro")
    e2 = sub("customer.subscription.deleted", T0 + 2, "sub_1", plan="pro", status="canceled")
    e3 = sub("customer.subscription.created", T0 + 3, "sub_2", plan="team", current_period_end=1_765_000_000)
    return e1, e2, e3


@pytest.mark.parametrize("order", ["E3,E1,E2", "E3,E2,E1", "E1,E2,E3", "E2,E3,E1", "E2,E1,E3", "E1,E3,E2"])
def test_an_upgrade_delivered_in_any_order_ends_on_the_new_subscription(order: str) -> None:
    events = dict(zip(("E1", "E2", "E3"), upgrade_events(), strict=True))
    state = deliver([events[name] for name in order.split(",")])
    assert (state.plan, state.subscription_id, state.period_end) == ("team", "sub_2", 1_765_000_000)
    assert list(state.ended_subscriptions) == ["sub_1"]


def test_a_late_update_of_an_ended_subscription_is_ignored_and_says_why() -> None:
    e1, e2, e3 = upgrade_events()
    state = deliver([e2, e3])
    t = apply_event(state, e1)
    assert t.outcome == "ignored: subscription sub_1 has ended"
    assert t.effects == []


def test_an_older_event_of_a_non_current_subscription_is_ignored() -> None:
    """Two live subscriptions: the newer event decides; an older one of the other subscription is not
    allowed to take the org back."""
    newer = sub("customer.subscription.updated", T0 + 5, "sub_2", plan="team")
    older = sub("customer.subscription.updated", T0 + 4, "sub_1", plan="pro")
    t = apply_event(deliver([newer]), older)
    assert t.outcome.startswith("ignored: sub_1 is not the current subscription sub_2")
    assert (t.state.plan, t.state.subscription_id) == ("team", "sub_2")


def test_create_new_then_delete_old_delivered_deletion_first_ends_on_the_new_one() -> None:
    """Stripe may create the new subscription before it deletes the old one: the deletion, delivered
    first, resets the plan, and the older creation of the new subscription still applies."""
    e1 = sub("customer.subscription.created", T0 + 1, "sub_1", plan="pro")
    e3 = sub("customer.subscription.created", T0 + 2, "sub_2", plan="team")
    e2 = sub("customer.subscription.deleted", T0 + 3, "sub_1", plan="pro", status="canceled")
    for order in itertools.permutations([e1, e2, e3]):
        state = deliver(list(order))
        assert (state.plan, state.subscription_id) == ("team", "sub_2"), [e.id for e in order]


def test_the_first_event_records_the_customer_and_a_later_one_never_repoints_it() -> None:
    e1 = sub("customer.subscription.created", T0 + 1, "sub_1", plan="pro", customer_id="cus_A")
    e2 = sub("customer.subscription.updated", T0 + 2, "sub_1", plan="team", customer_id="cus_B")
    assert deliver([e1, e2]).stripe_customer_id == "cus_A"
    assert deliver([e1], PaymentState(stripe_customer_id="cus_known")).stripe_customer_id == "cus_known"


# --------------------------------------------------------------------------------------------------
# Property: generated lifecycles, every order, duplicates.


@dataclass
class Lifecycle:
    """Builds one org's events in the order Stripe would create them (strictly increasing `created`)."""

    events: list[BillingEvent] = field(default_factory=list)
    created: int = T0
    subscription: str | None = None
    subscriptions: int = 0
    plan: str = "pro"
    cancelling: bool = False
    downgrade_to: str | None = None
    period_end: int = 1_762_000_000
    invoices: int = 0
    open_invoices: list[tuple[str, str]] = field(default_factory=list)

    def _tick(self) -> int:
        self.created += 1
        return self.created

    def _sub_event(self, event_type: str, subscription_id: str, **kwargs: Any) -> None:
        created = self._tick()
        payload = sp.subscription(
            subscription_id=subscription_id,
            plan=kwargs.pop("plan", self.plan),
            current_period_end=self.period_end,
            cancel_at_period_end=kwargs.pop("cancel", self.cancelling),
            downgrade_to=kwargs.pop("downgrade_to", self.downgrade_to),
            **kwargs,
        )
        self.events.append(
            parsed(sp.subscription_event(event_type, payload, created=created, event_id=f"evt_{created}"))
        )

    def create(self, plan: str) -> None:
        self.subscriptions += 1
        self.subscription, self.plan, self.cancelling, self.downgrade_to = (
            f"sub_{self.subscriptions}", plan, False, None,
        )  # fmt: skip
        self.period_end += 1000
        self._sub_event("customer.subscription.created", self.subscription)

    def update(self, plan: str) -> None:
        if self.subscription is None:
            return self.create(plan)
        self.plan, self.period_end = plan, self.period_end + 1000
        self._sub_event("customer.subscription.updated", self.subscription)

    def cancel(self, downgrade_to: str | None) -> None:
        if self.subscription is not None:
            self.cancelling, self.downgrade_to = True, downgrade_to
            self._sub_event("customer.subscription.updated", self.subscription)

    def undo_cancel(self) -> None:
        if self.subscription is not None:
            self.cancelling, self.downgrade_to = False, None
            self._sub_event("customer.subscription.updated", self.subscription)

    def delete(self) -> None:
        if self.subscription is not None:
            self._sub_event("customer.subscription.deleted", self.subscription, status="canceled")
            self.subscription = None

    def upgrade(self, plan: str, delete_first: bool) -> None:
        """Move to a new subscription: the old one ends, before or after the new one is created."""
        old = self.subscription
        if old is not None and delete_first:
            self.delete()
        self.create(plan)
        if old is not None and not delete_first:
            self._sub_event("customer.subscription.deleted", old, status="canceled", cancel=False)

    def fail(self, kind: str) -> None:
        self.invoices += 1
        invoice_id = f"in_{self.invoices}"
        prices = [sp.price(), METERED] if kind == "metered" else None
        inv = sp.invoice(shape="old", invoice_id=invoice_id, subscription_id=self.subscription, prices=prices)
        created = self._tick()
        self.events.append(
            parsed(
                sp.invoice_event("invoice.payment_failed", inv, created=created, event_id=f"evt_{created}")
            )
        )
        self.open_invoices.append((invoice_id, kind))

    def pay(self, which: int) -> None:
        if not self.open_invoices:
            return
        invoice_id, kind = self.open_invoices.pop(which % len(self.open_invoices))
        prices = [sp.price(), METERED] if kind == "metered" else None
        inv = sp.invoice(shape="old", invoice_id=invoice_id, subscription_id=self.subscription, prices=prices)
        created = self._tick()
        self.events.append(
            parsed(sp.invoice_event("invoice.paid", inv, created=created, event_id=f"evt_{created}"))
        )


plans = st.sampled_from(PLANS)
steps = st.one_of(
    st.tuples(st.just("update"), plans),
    st.tuples(st.just("cancel"), st.sampled_from([None, "free", "pro"])),
    st.tuples(st.just("undo_cancel")),
    st.tuples(st.just("upgrade"), plans, st.booleans()),
    st.tuples(st.just("delete")),
    st.tuples(st.just("create"), plans),
    st.tuples(st.just("fail"), st.sampled_from(["metered", "plan"])),
    st.tuples(st.just("pay"), st.integers(0, 5)),
)


@st.composite
def lifecycles(draw: st.DrawFn) -> list[BillingEvent]:
    life = Lifecycle()
    life.create(draw(plans))
    for name, *args in draw(st.lists(steps, min_size=1, max_size=8)):
        if name == "create" and life.subscription is not None:
            continue  # one subscription at a time; `upgrade` covers moving to a new one
        getattr(life, name)(*args)
    return life.events


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[BillingEvent], list[BillingEvent]]:
    """(in-order events, the same events in any order with some delivered again)."""
    events = draw(lifecycles())
    again = draw(st.lists(st.sampled_from(events), max_size=4))
    return events, draw(st.permutations(events + again))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries())
def test_any_order_with_duplicates_ends_as_in_order_delivery(
    case: tuple[list[BillingEvent], list[BillingEvent]],
) -> None:
    in_order, shuffled = case
    assert observable(deliver(shuffled)) == observable(deliver(in_order))


@settings(max_examples=60, deadline=None)
@given(lifecycles().filter(lambda events: len(events) <= 6))
def test_every_order_of_a_short_lifecycle_ends_as_in_order_delivery(events: list[BillingEvent]) -> None:
    expected = observable(deliver(events))
    for order in itertools.permutations(events):
        assert observable(deliver(list(order))) == expected, [e.id for e in order]
