"""The per-organization payment state machine, as a deterministic pure reducer.

It runs INSIDE the `org-billing/{org_id}` Temporal workflow, so it must be deterministic: no clock, no
randomness, no I/O; only the standard library and pydantic. The workflow feeds it one input at a time
(a Stripe event signal, an operator action, the result of an activity it asked for) and gets back a
`Transition`: the new `PaymentState`, the side effects to carry out as activities, and a one-line
`outcome` for the history and the UI.

Contract (SPEC.md, "Payment state machine"), summarised:

* failed metered invoice -> `blocked`; failed plan invoice -> `past_due` + downgrade to `free` scheduled
  at period end (`pending_plan=free`);
* a paid invoice clears only its own failure; metered and plan failures are tracked separately per
  invoice and `payment_status` shows the most severe;
* subscriptions set plan / subscription id / period end / pending plan; schedules set and clear the
  pending plan;
* an event seen before (same id) or older than the last one applied for the same object changes nothing.

Decisions where the contract is silent are documented on the functions below; the main ones:

* `invoice.voided` clears that invoice's failure (nothing is owed any more);
  `invoice.marked_uncollectible` opens (or keeps open) a failure for it: the money was not collected.
* Ordering is per object with Stripe's one-second `created`: an event is stale only when strictly older
  than the last applied event for that object, so two events of the same second both apply.
* Subscription order does not matter (issue 11, finding 5). Subscriptions that have ended are
  remembered (`ended_subscriptions`) and every later event about them (or their schedules) is ignored.
  An event of a subscription other than the current one is ignored when it is older than the newest
  applied event of a live subscription (`live_subscription_created`), so a late update of the old
  subscription of an upgrade cannot take the org back. Terminal events of a non-current subscription
  never reset the plan; with no current subscription the plan is the one the most recently ended
  subscription left (by its terminal event's `created`), whatever order the ends arrived in. Ties:
  Stripe's `created` has one-second resolution, so two subscriptions' events of the same second are
  applied in arrival order.
* `pending_plan` is derived (`_derive_pending_plan`) from its sources, so that no order of failures,
  cancellations and schedules changes it: an open plan failure means `free` (the downgrade we schedule
  overrides the subscription's own `downgrade_to`), else the current subscription's scheduled
  cancellation, else the schedule's next phase.
* The org records the Stripe customer of the first event it gets when it has none
  (`stripe_customer_id`), never re-points a recorded one (the webhook receiver routes by customer).
* When paying a plan invoice lifts the last plan failure, the downgrade we scheduled for it is revoked
  (`RevokeDowngrade`): a customer who paid keeps their plan.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from billing.domain.plans import Plan
from billing.domain.stripe_events import BillingEvent, InvoiceKind, validate_plan

PaymentStatus = Literal["ok", "past_due", "blocked"]

# Bounds on the state's bookkeeping. The state is carried across continue-as-new, so it must not grow
# without limit.
#
# Seen event ids: bounded is fine because this is only the second line of defence: the webhook receiver
# already dedupes event ids durably in PostgreSQL before signalling, and Stripe redelivers within days,
# i.e. within far fewer than 1,000 events of one organisation. An event that slipped past both is still
# caught by the per-object `created` ordering unless it is the newest event of its object, in which case
# applying it again only re-asserts what is already that object's latest state.
MAX_SEEN_EVENT_IDS: Final = 1_000
# Last applied `created` per object: pruned oldest-first; an object untouched for 1,000 newer objects is
# long settled (invoices are monthly) and its late events would be old anyway.
MAX_LAST_APPLIED: Final = 1_000
MAX_RECENT_EVENTS: Final = 50
MAX_OPERATOR_ACTIONS: Final = 50
MAX_DOWNGRADE_ERRORS: Final = 20
# Ended subscriptions remembered so that their late events are ignored; an org has a handful in its life.
MAX_ENDED_SUBSCRIPTIONS: Final = 100

ACTIVE_SUBSCRIPTION_STATUSES: Final[frozenset[str]] = frozenset({"active", "trialing"})
TERMINAL_SUBSCRIPTION_STATUSES: Final[frozenset[str]] = frozenset(
    {"canceled", "unpaid", "incomplete_expired"}
)
FAILURE_EVENT_TYPES: Final[frozenset[str]] = frozenset(
    {"invoice.payment_failed", "invoice.marked_uncollectible"}
)
SETTLED_EVENT_TYPES: Final[frozenset[str]] = frozenset(
    {"invoice.paid", "invoice.payment_succeeded", "invoice.voided"}
)
SCHEDULE_ENDED_EVENT_TYPES: Final[frozenset[str]] = frozenset(
    {"subscription_schedule.completed", "subscription_schedule.canceled", "subscription_schedule.released"}
)

DOWNGRADE_REASON_PLAN_PAYMENT_FAILED: Final = "plan_payment_failed"


# --------------------------------------------------------------------------------------------------
# State


class Failure(BaseModel):
    """An open payment failure of one invoice."""

    reason: str
    created: int = Field(description="`created` of the Stripe event that opened or last updated it")
    event_id: str


class OperatorBlock(BaseModel):
    reason: str
    at: int


class OperatorAction(BaseModel):
    """An operator override, kept in the state so `billing status` can say who unblocked what and why."""

    action: Literal["block", "unblock"]
    reason: str
    at: int
    note: str = ""


class RecentEvent(BaseModel):
    id: str
    type: str
    created: int
    outcome: str


class EndedSubscription(BaseModel):
    """A subscription that has ended: when (its terminal event's `created`) and the plan it left."""

    created: int
    plan: Plan


class StripeRefusal(BaseModel):
    """A Stripe call that was refused for good (a 4xx); shown in the state, never retried."""

    at: int
    action: str
    subscription_id: str
    message: str


class PaymentState(BaseModel):
    """Everything the org workflow knows about an organization's plan and payments."""

    plan: Plan = "free"
    pending_plan: Plan | None = None
    # Who set `pending_plan`, so that the end of a subscription schedule does not clear a downgrade that
    # a scheduled cancellation set, and so that paying the failed plan invoice withdraws the downgrade
    # its failure announced ("payment_failure") but not one Stripe confirmed ("cancellation").
    pending_plan_source: Literal["schedule", "cancellation", "payment_failure"] | None = None
    # `pending_plan` is derived from these (see `_derive_pending_plan`), so that it does not depend on
    # the order in which failures, cancellations and schedules arrive: an open plan failure means `free`
    # (the downgrade we schedule overrides the subscription's own `downgrade_to`), else the current
    # subscription's scheduled cancellation, else the schedule's next phase.
    cancellation_pending: Plan | None = None
    schedule_pending: Plan | None = None
    period_end: int | None = None
    subscription_id: str | None = None

    failed_metered: dict[str, Failure] = Field(
        default_factory=dict, description="open failures by invoice id"
    )
    failed_plan: dict[str, Failure] = Field(default_factory=dict, description="open failures by invoice id")
    operator_block: OperatorBlock | None = None
    operator_actions: list[OperatorAction] = Field(default_factory=list)

    # Subscription for which we asked Stripe to cancel at period end because a plan invoice failed.
    downgrade_scheduled_for: str | None = None
    # Id of the subscription event whose plan is being looked up in Stripe (a `ResolvePlan` effect).
    awaiting_plan_event_id: str | None = None

    last_applied: dict[str, int] = Field(
        default_factory=dict,
        description="`created` of the last applied event, per invoice/subscription/schedule",
    )
    ended_subscriptions: dict[str, EndedSubscription] = Field(
        default_factory=dict,
        description="subscriptions known to have ended: their later events change nothing",
    )
    live_subscription_created: int | None = Field(
        default=None, description="`created` of the newest applied event of a live (not ended) subscription"
    )
    stripe_customer_id: str | None = Field(
        default=None, description="the org's Stripe customer, recorded from its first event when unknown"
    )
    seen_event_ids: list[str] = Field(default_factory=list)
    recent_events: list[RecentEvent] = Field(default_factory=list)
    downgrade_errors: list[StripeRefusal] = Field(default_factory=list)

    @model_validator(mode="after")
    def _pending_components(self) -> PaymentState:
        """A state given only `pending_plan` (seeded from the database, or carried over from a run that
        predates the components) keeps it: it is attributed to its source."""
        if self.pending_plan is not None and (self.cancellation_pending, self.schedule_pending) == (
            None,
            None,
        ):
            if self.pending_plan_source == "cancellation":
                self.cancellation_pending = self.pending_plan
            elif self.pending_plan_source != "payment_failure" or not self.failed_plan:
                self.schedule_pending = self.pending_plan
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def payment_status(self) -> PaymentStatus:
        """`blocked` over `past_due` over `ok`."""
        if self.operator_block is not None or self.failed_metered:
            return "blocked"
        if self.failed_plan:
            return "past_due"
        return "ok"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status_reasons(self) -> list[str]:
        """Human-readable reasons for `payment_status`, most severe first (for `billing status`)."""
        reasons: list[str] = []
        if self.operator_block is not None:
            reasons.append(f"blocked by operator: {self.operator_block.reason}")
        # Oldest first, independent of the order the events arrived in.
        for kind, failures in (("metered", self.failed_metered), ("plan", self.failed_plan)):
            ordered = sorted(failures.items(), key=lambda item: (item[1].created, item[0]))
            reasons += [f"{kind} {failure.reason}" for _, failure in ordered]
        if self.downgrade_errors:
            last = self.downgrade_errors[-1]
            reasons.append(f"Stripe refused {last.action} of {last.subscription_id}: {last.message}")
        return reasons


# --------------------------------------------------------------------------------------------------
# Effects: what the workflow must do (as activities) after a transition.


class RecomputeQuota(BaseModel):
    """Recompute the org's projects' excess flags: a block flags everything, and limits follow the plan."""

    kind: Literal["recompute_quota"] = "recompute_quota"
    reason: str


class ScheduleDowngrade(BaseModel):
    """Set `cancel_at_period_end` on the subscription with metadata `downgrade_to`/`downgrade_reason`.

    A 4xx refusal must be reported back with `record_stripe_refusal`, never raised out of the workflow.
    """

    kind: Literal["schedule_downgrade"] = "schedule_downgrade"
    subscription_id: str
    downgrade_to: Plan = "free"
    downgrade_reason: str = DOWNGRADE_REASON_PLAN_PAYMENT_FAILED
    idempotency_key: str


class RevokeDowngrade(BaseModel):
    """Undo a `ScheduleDowngrade` (cancel_at_period_end=false, clear `downgrade_to`/`downgrade_reason`).

    The activity must only undo it if the subscription's metadata `downgrade_reason` is still
    `plan_payment_failed`: a cancellation the customer asked for themselves is not ours to revoke.
    """

    kind: Literal["revoke_downgrade"] = "revoke_downgrade"
    subscription_id: str
    idempotency_key: str


class ResolvePlan(BaseModel):
    """Retrieve the Stripe product and derive the plan (`billing.domain.stripe_events.plan_from_product`).

    Feed the result back with `apply_resolved_plan(state, event, plan)`.
    """

    kind: Literal["resolve_plan"] = "resolve_plan"
    product_id: str
    subscription_id: str
    event_id: str


class ResolveInvoiceKind(BaseModel):
    """Retrieve these prices; the invoice is metered if any is (`billing.domain.stripe_events.price_is_metered`).

    Feed the result back with `apply_resolved_invoice_kind(state, event, kind)`.
    """

    kind: Literal["resolve_invoice_kind"] = "resolve_invoice_kind"
    invoice_id: str
    price_ids: list[str]
    event_id: str


Effect = Annotated[
    RecomputeQuota | ScheduleDowngrade | RevokeDowngrade | ResolvePlan | ResolveInvoiceKind,
    Field(discriminator="kind"),
]


class Transition(BaseModel):
    """Result of one reducer step."""

    model_config = ConfigDict(frozen=True)

    state: PaymentState
    effects: list[Effect] = Field(default_factory=list)
    outcome: str = Field(description="'applied', 'duplicate', 'stale' or 'ignored: <why>'")
    warnings: list[str] = Field(default_factory=list, description="for the workflow to log")


# --------------------------------------------------------------------------------------------------
# Public reducer functions


def apply_event(state: PaymentState, event: BillingEvent) -> Transition:
    """Apply one parsed Stripe event. Never mutates `state`.

    A duplicate (event id already seen) returns `state` itself, unchanged in every field. A stale event
    (older than the last applied for the same object) and an ignored one are recorded as seen and in
    `recent_events`, and change nothing else.
    """
    if event.id in state.seen_event_ids:
        return Transition(state=state, outcome="duplicate")

    new = state.model_copy(deep=True)
    _remember_seen(new, event.id)
    warnings = list(event.warnings)
    effects: list[Effect] = []

    if new.stripe_customer_id is None and event.customer_id:
        # Routed here by metadata because no org had this customer: the org records it (the Stripe
        # report sender needs it). A recorded customer is never re-pointed.
        new.stripe_customer_id = event.customer_id
    if event.object_kind == "subscription" and event.object_id in new.ended_subscriptions:
        outcome = f"ignored: subscription {event.object_id} has ended"
    elif new.last_applied.get(event.object_id, -1) > event.created:
        outcome = "stale"
    elif event.object_kind == "invoice":
        outcome = _apply_invoice_event(new, event, effects, warnings)
    elif event.object_kind == "subscription":
        outcome = _apply_subscription_event(new, event, effects, warnings)
    else:
        outcome = _apply_schedule_event(new, event, warnings)

    if outcome == "applied":
        _mark_applied(new, event.object_id, event.created)
    _derive_pending_plan(new)
    _remember_recent(new, RecentEvent(id=event.id, type=event.type, created=event.created, outcome=outcome))
    return Transition(
        state=new, effects=_quota_effects(state, new) + effects, outcome=outcome, warnings=warnings
    )


def apply_resolved_plan(state: PaymentState, event: BillingEvent, plan: str | None) -> Transition:
    """Finish a subscription event that needed `ResolvePlan`: set the plan the product stands for.

    Applies only if `event` is still the latest subscription event waiting for its plan; a newer
    subscription event in between makes this result stale. `plan` is validated again; None (the product
    says nothing) leaves the plan as it was.
    """
    if state.awaiting_plan_event_id != event.id:
        return Transition(state=state, outcome="stale")
    new = state.model_copy(deep=True)
    new.awaiting_plan_event_id = None
    warnings: list[str] = []
    valid = validate_plan(plan, source=f"plan resolved from product {event.product_id}", warnings=warnings)
    if valid is None:
        outcome = f"ignored: no plan could be derived from product {event.product_id}"
        warnings.append(f"subscription {event.subscription_id}: {outcome.removeprefix('ignored: ')}")
    else:
        new.plan = valid
        outcome = "applied"
    _remember_recent(
        new,
        RecentEvent(
            id=event.id, type=f"{event.type} (plan resolved)", created=event.created, outcome=outcome
        ),
    )
    return Transition(state=new, effects=_quota_effects(state, new), outcome=outcome, warnings=warnings)


def apply_resolved_invoice_kind(state: PaymentState, event: BillingEvent, kind: InvoiceKind) -> Transition:
    """Finish a failure event that needed `ResolveInvoiceKind`: open the failure as `kind`.

    Stale if a newer event of the same invoice (a payment, say) was applied meanwhile.
    """
    if state.last_applied.get(event.object_id, -1) > event.created:
        return Transition(state=state, outcome="stale")
    new = state.model_copy(deep=True)
    effects: list[Effect] = []
    warnings: list[str] = []
    resolved = event.model_copy(update={"invoice_kind": kind, "unresolved_price_ids": []})
    outcome = _apply_invoice_event(new, resolved, effects, warnings)
    _derive_pending_plan(new)
    _remember_recent(
        new,
        RecentEvent(id=event.id, type=f"{event.type} (kind {kind})", created=event.created, outcome=outcome),
    )
    return Transition(
        state=new, effects=_quota_effects(state, new) + effects, outcome=outcome, warnings=warnings
    )


def apply_operator(
    state: PaymentState, action: Literal["block", "unblock"], reason: str, at: int
) -> Transition:
    """Operator override (`billing block` / `billing unblock`).

    `block` forces `blocked` until an unblock. `unblock` lifts the operator block AND closes every open
    metered failure (the operator decided the org may write again; the invoices stay unpaid in Stripe).
    Plan failures are left alone: `past_due` is not a block. A later failure of the same invoice (Stripe
    retries it and the payment fails again) is new information and blocks again.
    """
    if action not in ("block", "unblock"):
        raise ValueError(f"unknown operator action {action!r}; expected 'block' or 'unblock'")
    if not reason.strip():
        raise ValueError("an operator action needs a reason")
    new = state.model_copy(deep=True)
    note = ""
    if action == "block":
        new.operator_block = OperatorBlock(reason=reason, at=at)
    else:
        new.operator_block = None
        if new.failed_metered:
            note = "closed metered failures of " + ", ".join(sorted(new.failed_metered))
        new.failed_metered = {}
    new.operator_actions = [
        *new.operator_actions,
        OperatorAction(action=action, reason=reason, at=at, note=note),
    ][-MAX_OPERATOR_ACTIONS:]
    _remember_recent(
        new,
        RecentEvent(id=f"operator:{action}:{at}", type=f"operator.{action}", created=at, outcome="applied"),
    )
    return Transition(state=new, effects=_quota_effects(state, new), outcome="applied")


def record_stripe_refusal(
    state: PaymentState, effect: ScheduleDowngrade | RevokeDowngrade, message: str, at: int
) -> Transition:
    """Record that Stripe refused `effect` for good (4xx). Shown in the state; the workflow carries on.

    A refused downgrade means none is scheduled (`downgrade_scheduled_for` cleared); the pending plan
    stays as the contract set it, and the subscription events Stripe sends will correct it.
    """
    new = state.model_copy(deep=True)
    action = "downgrade" if isinstance(effect, ScheduleDowngrade) else "downgrade revocation"
    new.downgrade_errors = [
        *new.downgrade_errors,
        StripeRefusal(at=at, action=action, subscription_id=effect.subscription_id, message=message),
    ][-MAX_DOWNGRADE_ERRORS:]
    if isinstance(effect, ScheduleDowngrade) and new.downgrade_scheduled_for == effect.subscription_id:
        new.downgrade_scheduled_for = None
    return Transition(
        state=new,
        outcome="applied",
        warnings=[f"Stripe refused {action} of {effect.subscription_id}: {message}"],
    )


# --------------------------------------------------------------------------------------------------
# Handlers. Each mutates `state` (a private copy) and returns the outcome.


def _apply_invoice_event(
    state: PaymentState, event: BillingEvent, effects: list[Effect], warnings: list[str]
) -> str:
    invoice_id = event.object_id
    if event.type in SETTLED_EVENT_TYPES:
        # Paid or voided: whatever this invoice's failure was, it is over. Only this invoice's.
        state.failed_metered.pop(invoice_id, None)
        plan_failure = state.failed_plan.pop(invoice_id, None)
        if plan_failure is not None and not state.failed_plan:
            # The last plan failure is settled: withdraw the downgrade it caused. If Stripe already
            # confirmed the cancellation, pending_plan follows it until the subscription update that
            # RevokeDowngrade causes.
            if state.downgrade_scheduled_for:
                effects.append(
                    RevokeDowngrade(
                        subscription_id=state.downgrade_scheduled_for,
                        idempotency_key=f"revoke-downgrade:{event.id}",
                    )
                )
                state.downgrade_scheduled_for = None
        return "applied"

    if event.type not in FAILURE_EVENT_TYPES:  # pragma: no cover - parse_event only yields the above
        return f"ignored: unhandled invoice event {event.type}"

    if event.invoice_kind != "metered" and event.unresolved_price_ids:
        # The newer line shape names prices without saying whether they are metered: ask Stripe first.
        # The event counts as applied for ordering, so a payment that arrives meanwhile wins.
        effects.append(
            ResolveInvoiceKind(
                invoice_id=invoice_id, price_ids=list(event.unresolved_price_ids), event_id=event.id
            )
        )
        return "applied"

    failure = Failure(
        reason=event.failure_reason or f"invoice {invoice_id} {event.type.removeprefix('invoice.')}",
        created=event.created,
        event_id=event.id,
    )
    if event.invoice_kind == "metered":
        state.failed_plan.pop(invoice_id, None)
        state.failed_metered[invoice_id] = failure
        return "applied"

    state.failed_metered.pop(invoice_id, None)
    newly_opened = invoice_id not in state.failed_plan
    state.failed_plan[invoice_id] = failure
    if newly_opened:
        # Later attempts of the same invoice update the failure but do not schedule the downgrade again.
        subscription_id = event.subscription_id or state.subscription_id
        if subscription_id is None:
            warnings.append(
                f"plan invoice {invoice_id} failed but has no subscription: no downgrade scheduled"
            )
        else:
            effects.append(
                ScheduleDowngrade(subscription_id=subscription_id, idempotency_key=f"downgrade:{event.id}")
            )
            state.downgrade_scheduled_for = subscription_id
    return "applied"


def _apply_subscription_event(
    state: PaymentState, event: BillingEvent, effects: list[Effect], warnings: list[str]
) -> str:
    status = event.subscription_status
    subscription_id = event.object_id
    is_current = state.subscription_id == subscription_id
    terminal = event.type == "customer.subscription.deleted" or status in TERMINAL_SUBSCRIPTION_STATUSES

    if subscription_id in state.ended_subscriptions:
        return f"ignored: subscription {subscription_id} has ended"
    if terminal:
        # Remembered whatever happens next: any later event about it is about a dead subscription.
        ended = dict(state.ended_subscriptions)
        ended[subscription_id] = EndedSubscription(created=event.created, plan=event.downgrade_to or "free")
        if len(ended) > MAX_ENDED_SUBSCRIPTIONS:
            kept = sorted(ended.items(), key=lambda kv: (kv[1].created, kv[0]))[-MAX_ENDED_SUBSCRIPTIONS:]
            ended = dict(kept)
        state.ended_subscriptions = ended
        if not is_current and state.subscription_id is not None:
            return f"ignored: {subscription_id} is not the current subscription {state.subscription_id}"
        # No live subscription left: the org is on the plan the most recently ended one left it, which
        # is this one unless a newer end was seen first (delivered out of order).
        last_id, last_ended = max(ended.items(), key=lambda kv: (kv[1].created, kv[0]))
        if not is_current and last_id != subscription_id:
            return f"ignored: {subscription_id} ended before {last_id}, whose end is applied"
        state.plan = last_ended.plan
        state.cancellation_pending = None
        state.schedule_pending = None
        state.subscription_id = None
        state.period_end = None
        state.downgrade_scheduled_for = None
        state.awaiting_plan_event_id = None
        return "applied"

    if status not in ACTIVE_SUBSCRIPTION_STATUSES:
        # incomplete, past_due, paused: invoices drive the payment status, nothing to sync here.
        return f"ignored: subscription status {status}"
    live = state.live_subscription_created
    if not is_current and live is not None and event.created < live:
        return (
            f"ignored: {subscription_id} is not the current subscription {state.subscription_id} "
            "and older than the newest subscription event applied"
        )

    state.subscription_id = subscription_id
    state.period_end = event.current_period_end
    state.live_subscription_created = max(event.created, state.live_subscription_created or event.created)
    plan = event.metadata_plan or event.product_plan
    if plan is not None:
        state.plan = plan
        state.awaiting_plan_event_id = None
    elif event.product_id is not None:
        effects.append(
            ResolvePlan(product_id=event.product_id, subscription_id=event.object_id, event_id=event.id)
        )
        state.awaiting_plan_event_id = event.id
    else:
        warnings.append(f"subscription {event.object_id} has no plan metadata and no product; plan unchanged")

    state.cancellation_pending = (event.downgrade_to or "free") if event.cancellation_scheduled else None
    if event.schedule_id is None:
        # No schedule attached any more: a next phase it announced no longer holds.
        state.schedule_pending = None
    return "applied"


def _apply_schedule_event(state: PaymentState, event: BillingEvent, warnings: list[str]) -> str:
    if event.subscription_id is not None and event.subscription_id in state.ended_subscriptions:
        return f"ignored: schedule of subscription {event.subscription_id}, which has ended"
    if (
        state.subscription_id is not None
        and event.subscription_id is not None
        and event.subscription_id != state.subscription_id
    ):
        return (
            f"ignored: schedule for {event.subscription_id}, "
            f"not the current subscription {state.subscription_id}"
        )

    # A pending downgrade from a cancellation or a failed plan payment outranks a schedule's next phase
    # (the subscription ends at period end): `_derive_pending_plan` says so, whatever the order.
    schedule_ended = event.type in SCHEDULE_ENDED_EVENT_TYPES or not event.schedule_active
    if not schedule_ended and event.schedule_next_plan is not None:
        state.schedule_pending = event.schedule_next_plan
        return "applied"
    # Ended, or no upcoming phase with a known plan: a pending plan this schedule set no longer holds.
    if not schedule_ended:
        warnings.append(
            f"subscription schedule {event.object_id} has no next phase with a plan in its metadata"
        )
    state.schedule_pending = None
    return "applied"


# --------------------------------------------------------------------------------------------------
# Bookkeeping


def _derive_pending_plan(state: PaymentState) -> None:
    """`pending_plan` and its source from the components: failure over cancellation over schedule."""
    if state.failed_plan:
        state.pending_plan, state.pending_plan_source = "free", "payment_failure"
    elif state.cancellation_pending is not None:
        state.pending_plan, state.pending_plan_source = state.cancellation_pending, "cancellation"
    elif state.schedule_pending is not None:
        state.pending_plan, state.pending_plan_source = state.schedule_pending, "schedule"
    else:
        state.pending_plan, state.pending_plan_source = None, None


def _quota_effects(before: PaymentState, after: PaymentState) -> list[Effect]:
    """`RecomputeQuota` when being blocked or unblocked, or the plan changed.

    The billing row needs no effect: the workflow writes whatever of it differs from the state.
    """
    effects: list[Effect] = []
    was_blocked, is_blocked = before.payment_status == "blocked", after.payment_status == "blocked"
    if was_blocked != is_blocked:
        effects.append(RecomputeQuota(reason="blocked" if is_blocked else "unblocked"))
    elif before.plan != after.plan:
        effects.append(RecomputeQuota(reason=f"plan {before.plan} -> {after.plan}"))
    return effects


def _remember_seen(state: PaymentState, event_id: str) -> None:
    state.seen_event_ids = [*state.seen_event_ids, event_id][-MAX_SEEN_EVENT_IDS:]


def _remember_recent(state: PaymentState, entry: RecentEvent) -> None:
    state.recent_events = [*state.recent_events, entry][-MAX_RECENT_EVENTS:]


def _mark_applied(state: PaymentState, object_id: str, created: int) -> None:
    state.last_applied[object_id] = max(created, state.last_applied.get(object_id, created))
    if len(state.last_applied) > MAX_LAST_APPLIED:
        # Keep the most recently touched objects; ties broken by id so pruning is deterministic.
        kept = sorted(state.last_applied.items(), key=lambda kv: (kv[1], kv[0]))[-MAX_LAST_APPLIED:]
        state.last_applied = dict(sorted(kept))
