"""``org-billing/{org_id}``: one long-lived workflow per organization runs the payment state machine.

Stripe events (signals from the webhook receiver) and operator block/unblock (Temporal Updates from the
CLI, sent with update-with-start) go into one queue and are processed one at a time, so concurrent
deliveries for one org are serialised. Each is applied with the pure reducer (billing/domain/payment_state.py)
and its effects are carried out by activities (activities/payments.py): the billing row and quota flags
in one transaction, Stripe calls with an Idempotency-Key derived from the event. A Stripe refusal (4xx),
or a call that kept failing for an hour, is recorded in the state and the workflow carries on; it never
fails or wedges the org.

When things are written (issue 11, finding 6: acknowledged means enforced):

* an operator update returns only after the billing row (status and reason always written, whatever the
  dashboard wrote meanwhile) and the recomputed quota flags are committed, so when `billing block`
  returns the gateway already refuses the org's writes;
* a Stripe-driven change of `payment_status` or the plan is written (row and flags) in the workflow
  task that applied it: the signals queued when a task runs are applied one after the other and
  written once, with their final state, when the queue is drained (at least every
  BILLING_WRITE_EVERY events), and anything pending is written before any Stripe call, so a slow
  Stripe never holds back enforcement. That write also marks the events it carries `applied` in the
  webhook log (one transaction; ONE_WRITE_PER_DRAIN, issue 14). Runs recorded before that patch
  wrote each change of status or plan at once and the marks in an activity of their own.

The old `operator_block` / `operator_unblock` signals are still accepted (for callers of the previous
version); they are applied the same way but nothing waits for them.

The workflow continues as new after ``max_events_per_run`` signals or when Temporal suggests it, carrying
the state and every queued signal into the next run, so nothing is lost and the history stays small.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    import pydantic  # noqa: F401  (pass pydantic through, as the other workflows do)

    from billing.models.search_attributes import ORG_ID, PAYMENT_STATUS

from billing.domain.hours import hour_key
from billing.domain.months import month_key
from billing.domain.payment_state import (
    Effect,
    OperatorBlock,
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
from billing.domain.stripe_events import BillingEvent
from billing.models.contracts import PaymentContract, StripeReportContract
from billing.models.org_billing import (
    BILLING_COLUMNS,
    BillingColumns,
    FailedInvoice,
    MarkWebhookEventsInput,
    OperatorRequest,
    OrgBillingInput,
    OrgBillingView,
    OrgRef,
    QueuedSignal,
    ResolveInvoiceKindInput,
    ResolveInvoiceKindResult,
    ResolvePlanInput,
    ResolvePlanResult,
    StripeCallResult,
    SubscriptionChange,
    SyncOrgBillingInput,
)
from billing.models.stripe_report import StartStripeReportsInput
from workflows.common import ActivityMethod, ArgT, ResultT, run_db_activity

# Stripe calls: 429/5xx/timeouts are retried with backoff for up to an hour; after that the call is
# recorded like a refusal, so a long Stripe outage delays this org's later events by at most an hour.
STRIPE_TIMEOUT = timedelta(seconds=60)
STRIPE_GIVE_UP = timedelta(hours=1)
STRIPE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(minutes=5)
)
MAX_REASON_CHARS = 1000
MAX_OPERATOR_REQUEST_IDS = 20
STRIPE_EFFECTS = (ScheduleDowngrade, RevokeDowngrade, ResolvePlan, ResolveInvoiceKind)
# A burst of events is written to PostgreSQL once it is drained, and at least every this many events,
# so a steady stream never holds the billing row (and a block's quota flags) back for long.
BILLING_WRITE_EVERY = 20
# Issue 14 (patch id, recorded in every run that starts with it): the signals queued when a workflow
# task runs are applied one after the other in that task and written once, when the queue is drained
# (or every BILLING_WRITE_EVERY events, or before a Stripe call), with the final state: one transaction
# (activity sync_org_billing) for the billing row, the quota flags and the `applied` marks of those
# webhook events; the PaymentStatus search attribute is upserted once per write too. Before it, every
# change of status or plan was written at once, the marks in an activity of their own, and the search
# attribute upserted after every event: an event alone cost three workflow tasks and two activities,
# now two and one.
ONE_WRITE_PER_DRAIN = "org-billing-one-write-per-drain"


def reason_text(state: PaymentState) -> str | None:
    """`payment_status_reason`: the state's reasons on one line (None when there are none)."""
    text = "; ".join(state.status_reasons)
    return text[:MAX_REASON_CHARS] or None


def _billing_view(state: PaymentState) -> dict[str, object]:
    """The organization_billing columns the workflow owns (BILLING_COLUMNS), as it would write them."""
    return BillingColumns(
        plan=state.plan,
        pending_plan=state.pending_plan,
        period_end=state.period_end,
        subscription_id=state.subscription_id,
        payment_status=state.payment_status,
        payment_status_reason=reason_text(state),
    ).model_dump()


@workflow.defn
class OrgBillingWorkflow:
    """The payment state machine of one organization (see the module docstring)."""

    @workflow.init
    def __init__(self, request: OrgBillingInput) -> None:
        self._org_id = request.org_id
        self._state = request.state or PaymentState()
        self._queue: list[QueuedSignal] = list(request.queue)
        self._unmarked: dict[str, str] = dict(request.unmarked)
        self._events_applied = request.events_applied
        self._run_events = 0
        self._operator_request_ids = list(request.operator_request_ids)
        self._last_outcome = ""
        self._max_events_per_run = request.max_events_per_run
        # The billing row as last written (assumed current when continuing as new).
        self._written = _billing_view(self._state)
        # Whether quota flags must be recomputed at the next write (the billing row itself is
        # compared with `_written`). Writes wait until the queue is drained: a burst of events for the
        # org costs one transaction, not one per event.
        self._recompute_pending = False
        self._written_customer = self._state.stripe_customer_id
        # Operator request ids an update handler waits on, and those whose billing write is committed.
        self._awaited: set[str] = set()
        self._committed: set[str] = set()
        # Set by run() from the ONE_WRITE_PER_DRAIN patch: when the billing row and the marks are written.
        self._one_write = False

    # ---------------------------------------------------------------- signals and query

    @workflow.signal
    def stripe_event(self, event: BillingEvent) -> None:
        """A verified Stripe event for this org, from the webhook receiver."""
        self._queue.append(QueuedSignal(kind="stripe_event", event=event))

    @workflow.signal
    def operator_block(self, request: OperatorRequest) -> None:
        """`billing block`: block the org until an operator unblocks it."""
        self._queue.append(QueuedSignal(kind="operator_block", operator=request))

    @workflow.signal
    def operator_unblock(self, request: OperatorRequest) -> None:
        """`billing unblock`: lift the operator block and every open metered failure."""
        self._queue.append(QueuedSignal(kind="operator_unblock", operator=request))

    @workflow.update
    async def block(self, request: OperatorRequest) -> OrgBillingView:
        """`billing block`: returns once the org is blocked in PostgreSQL (row and every flag)."""
        return await self._operator_update("operator_block", request)

    @workflow.update
    async def unblock(self, request: OperatorRequest) -> OrgBillingView:
        """`billing unblock`: returns once the status is written and the flags are recomputed."""
        return await self._operator_update("operator_unblock", request)

    async def _operator_update(
        self, kind: Literal["operator_block", "operator_unblock"], request: OperatorRequest
    ) -> OrgBillingView:
        request_id = request.request_id or str(workflow.uuid4())
        request = request.model_copy(update={"request_id": request_id})
        # A retried request (the CLI run again after a timeout) is answered, not applied twice; the
        # recent ids are carried across continue-as-new.
        if request_id not in self._committed and request_id not in self._operator_request_ids:
            self._awaited.add(request_id)
            self._queue.append(QueuedSignal(kind=kind, operator=request))
            await workflow.wait_condition(lambda: request_id in self._committed)
            self._awaited.discard(request_id)
        return self.state()

    @workflow.query
    def state(self) -> OrgBillingView:
        """The state machine's view of the org, for `billing status` and GET /v1/orgs/{id}."""
        s = self._state
        failed = [
            FailedInvoice(invoice_id=invoice_id, kind=kind, **failure.model_dump())
            for kind, failures in (("metered", s.failed_metered), ("plan", s.failed_plan))
            for invoice_id, failure in sorted(failures.items(), key=lambda kv: (kv[1].created, kv[0]))
        ]
        return OrgBillingView(
            org_id=self._org_id,
            plan=s.plan,
            payment_status=s.payment_status,
            status_reasons=s.status_reasons,
            failed_invoices=failed,
            pending_plan=s.pending_plan,
            period_end=s.period_end,
            subscription_id=s.subscription_id,
            operator_block=s.operator_block,
            operator_actions=s.operator_actions,
            recent_events=s.recent_events,
            last_stripe_refusal=s.downgrade_errors[-1] if s.downgrade_errors else None,
            stripe_refusals=s.downgrade_errors,
            events_applied=self._events_applied,
            queued=len(self._queue),
            run_events=self._run_events,
            operator_request_ids=self._operator_request_ids,
        )

    # ---------------------------------------------------------------- main loop

    @workflow.run
    async def run(self, request: OrgBillingInput) -> None:
        """Process signals until the run is long enough, then continue as new with the state."""
        # Issue 14: one write per drained queue, carrying the webhook marks (see ONE_WRITE_PER_DRAIN).
        # Decided once per run, before any command, so a run recorded without it replays as it ran.
        self._one_write = workflow.patched(ONE_WRITE_PER_DRAIN)
        if request.state is None:
            await self._seed_from_database()
        self._upsert_payment_status()
        self._show_details()
        while True:
            await workflow.wait_condition(lambda: bool(self._queue) or self._should_continue_as_new())
            if self._should_continue_as_new() and not self._awaited_operator_items():
                # An operator update in flight has its item in the queue: it is applied first (below),
                # so no update is left waiting across continue-as-new. One that arrives while the
                # last writes run is applied too before this run ends.
                await self._flush_billing()
                await self._flush_marks()
                if not self._awaited_operator_items():
                    break
                continue
            item = self._next_item()
            await self._process(item)
            self._events_applied += 1
            self._run_events += 1
            written = not self._queue or self._run_events % BILLING_WRITE_EVERY == 0
            if written:
                await self._flush_billing()
                await self._flush_marks()
            # With ONE_WRITE_PER_DRAIN the search attributes follow the writes (a burst's final status,
            # once), not every event of a burst: each upsert is a visibility update in Temporal.
            if written or not self._one_write:
                self._upsert_payment_status()
                self._show_details()

        # Signal handlers only append to the queue; an operator update waits until its item is applied,
        # which the loop above guarantees before it stops (an answered update may still be returning).
        # Nothing is awaited between here and continuing, so no new update can slip in unanswered.
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            OrgBillingInput(
                org_id=self._org_id,
                state=self._state,
                queue=self._queue,
                unmarked=self._unmarked,
                events_applied=self._events_applied,
                max_events_per_run=self._max_events_per_run,
                operator_request_ids=self._operator_request_ids,
            )
        )

    def _awaited_operator_items(self) -> list[int]:
        """Queue positions of operator items an update handler is waiting on."""
        return [
            i
            for i, item in enumerate(self._queue)
            if item.operator is not None and item.operator.request_id in self._awaited
        ]

    def _next_item(self) -> QueuedSignal:
        """The queue's head, except when continuing as new is due: then the operator items awaited."""
        if self._should_continue_as_new():
            return self._queue.pop(self._awaited_operator_items()[0])
        return self._queue.pop(0)

    def _should_continue_as_new(self) -> bool:
        return self._run_events >= self._max_events_per_run or workflow.info().is_continue_as_new_suggested()

    async def _seed_from_database(self) -> None:
        """Start from what `organization_billing` says, so the first sync does not reset the plan.

        A `blocked` status set outside this workflow (the dashboard, the system this replaces) is kept
        as an operator block, lifted by `billing unblock`; a `past_due` one cannot be tied to an invoice
        and is left to the next plan invoice's events.
        """
        row = await run_db_activity(PaymentContract.load_org_billing, OrgRef(org_id=self._org_id))
        self._written = {column: getattr(row, column) for column in BILLING_COLUMNS} if row.found else {}
        self._written_customer = row.stripe_customer_id
        if not row.found:
            workflow.logger.warning("org %s has no billing row; starting from plan free", self._org_id)
            return
        self._state = PaymentState(
            plan=row.plan,
            pending_plan=row.pending_plan,
            period_end=row.period_end,
            subscription_id=row.subscription_id,
            stripe_customer_id=row.stripe_customer_id,
            operator_block=OperatorBlock(
                reason=f"blocked before org-billing started ({row.payment_status_reason or 'no reason given'})",
                at=int(workflow.now().timestamp()),
            )
            if row.payment_status == "blocked"
            else None,
        )

    async def _process(self, item: QueuedSignal) -> None:
        """Apply one queued signal and carry out every effect it causes."""
        if item.kind == "stripe_event" and item.event is not None:
            event = item.event
            transition = apply_event(self._state, event)
            await self._run_transition(transition, event)
            # The first processing of an event says what happened to it; later copies are duplicates.
            self._unmarked.setdefault(event.id, transition.outcome)
            self._last_outcome = f"{event.type} {event.object_id}: {transition.outcome}"
        elif item.operator is not None:
            action = "block" if item.kind == "operator_block" else "unblock"
            now = int(workflow.now().timestamp())
            transition = apply_operator(self._state, action, item.operator.reason, at=now)
            await self._run_transition(transition, None, write_early=False)
            # Acknowledged means enforced: the status is written whatever the row says now (the
            # dashboard may have written `blocked` itself) and the flags recomputed, before any reply.
            await self._flush_billing(force_status=True)
            if item.operator.request_id:
                self._committed.add(item.operator.request_id)
                self._operator_request_ids = [*self._operator_request_ids, item.operator.request_id][
                    -MAX_OPERATOR_REQUEST_IDS:
                ]
            self._last_outcome = f"operator {action}: {item.operator.reason}"

    async def _run_transition(
        self, transition: Transition, event: BillingEvent | None, *, write_early: bool = True
    ) -> None:
        """Adopt a transition's state, then carry out its effects (which may lead to more transitions).

        With `write_early`, a changed status or plan is written at once, and anything unwritten before
        a Stripe call; an operator action (no Stripe calls) writes once, forced, right after.
        """
        pending: list[tuple[Transition, BillingEvent | None]] = [(transition, event)]
        while pending:
            current, source = pending.pop(0)
            self._state = current.state
            for warning in current.warnings:
                workflow.logger.warning("org %s: %s", self._org_id, warning)
            effects = list(current.effects)
            # The billing row follows the state (written by _flush_billing); flags need asking for.
            if any(isinstance(e, RecomputeQuota) for e in effects):
                self._recompute_pending = True
            calls_stripe = any(isinstance(e, STRIPE_EFFECTS) for e in effects)
            # With ONE_WRITE_PER_DRAIN a changed status or plan is written when the queue is drained,
            # in the same workflow task (nothing is awaited in between but Stripe calls, and those
            # are preceded by a write here).
            changed = not self._one_write and self._enforcement_changed()
            if write_early and (changed or (calls_stripe and self._unwritten())):
                # Status and plan are what the gateway enforces: written now, not at the end of the
                # burst, and never behind a Stripe call that may take an hour.
                await self._flush_billing()
            for effect in effects:
                follow_up = await self._carry_out(effect, source)
                if follow_up is not None:
                    pending.append((follow_up, source))

    async def _carry_out(self, effect: Effect, event: BillingEvent | None) -> Transition | None:
        """Run one Stripe-side effect; returns the transition its result leads to, if any."""
        if isinstance(effect, ScheduleDowngrade | RevokeDowngrade):
            change = SubscriptionChange(
                action="schedule_downgrade" if isinstance(effect, ScheduleDowngrade) else "revoke_downgrade",
                subscription_id=effect.subscription_id,
                idempotency_key=effect.idempotency_key,
                **(
                    {"downgrade_to": effect.downgrade_to, "downgrade_reason": effect.downgrade_reason}
                    if isinstance(effect, ScheduleDowngrade)
                    else {}
                ),
            )
            try:
                result = await _stripe_activity(PaymentContract.change_stripe_subscription, change)
            except ActivityError as exc:
                result = StripeCallResult(done=False, message=f"gave up after retrying: {_cause(exc)}")
            if result.done:
                return None
            return record_stripe_refusal(self._state, effect, result.message, int(workflow.now().timestamp()))
        if isinstance(effect, ResolvePlan) and event is not None:
            try:
                plan_result = await _stripe_activity(
                    PaymentContract.resolve_plan, ResolvePlanInput(product_id=effect.product_id)
                )
            except ActivityError as exc:
                plan_result = ResolvePlanResult(plan=None, warnings=[f"gave up: {_cause(exc)}"])
            for warning in plan_result.warnings:
                workflow.logger.warning("org %s: %s", self._org_id, warning)
            return apply_resolved_plan(self._state, event, plan_result.plan)
        if isinstance(effect, ResolveInvoiceKind) and event is not None:
            try:
                kind_result = await _stripe_activity(
                    PaymentContract.resolve_invoice_kind, ResolveInvoiceKindInput(price_ids=effect.price_ids)
                )
            except ActivityError as exc:
                kind_result = ResolveInvoiceKindResult(kind="plan", note=f"gave up: {_cause(exc)}")
            if kind_result.note:
                workflow.logger.warning(
                    "org %s: invoice %s: %s", self._org_id, effect.invoice_id, kind_result.note
                )
            return apply_resolved_invoice_kind(self._state, event, kind_result.kind)
        return None  # RecomputeQuota: done with the billing row by _flush_billing.

    def _enforcement_changed(self) -> bool:
        """Whether the plan or payment status (what the flags follow) differs from what is written."""
        view = _billing_view(self._state)
        return self._recompute_pending or any(
            view[column] != self._written.get(column) for column in ("plan", "payment_status")
        )

    def _unwritten(self) -> bool:
        """Whether anything of the billing view (the customer included) is not written yet."""
        view = _billing_view(self._state)
        return (
            self._recompute_pending
            or self._state.stripe_customer_id != self._written_customer
            or any(view[column] != self._written.get(column) for column in BILLING_COLUMNS)
        )

    async def _flush_billing(self, *, force_status: bool = False) -> None:
        """Write what changed of the billing view (the row, its reasons, a newly learned Stripe customer)
        and recompute quota flags for this month if an event asked for it; nothing when nothing changed.

        `force_status` (operator actions) writes the status and its reason and recomputes the flags even
        when the workflow believes the row already says so.
        """
        s = self._state
        view = _billing_view(s)
        columns = [column for column in BILLING_COLUMNS if view[column] != self._written.get(column)]
        if force_status:
            columns = list(dict.fromkeys([*columns, "payment_status", "payment_status_reason"]))
        recompute = self._recompute_pending or force_status
        customer = s.stripe_customer_id if s.stripe_customer_id != self._written_customer else None
        if not columns and not recompute and customer is None:
            return
        # With ONE_WRITE_PER_DRAIN the events processed so far are marked in the same transaction:
        # their effects are in this write (or in an earlier one), and an event is added to _unmarked
        # only once its processing is over.
        marks: dict[str, str] = {}
        if self._one_write:
            marks, self._unmarked = self._unmarked, {}
        await run_db_activity(
            PaymentContract.sync_org_billing,
            SyncOrgBillingInput(
                org_id=self._org_id,
                **view,
                columns=columns,
                recompute_quota=recompute,
                month=month_key(workflow.now()),
                stripe_customer_id=customer,
                marks=marks,
            ),
        )
        self._written = view
        self._written_customer = s.stripe_customer_id
        self._recompute_pending = False
        # Overage queued while the org had no customer waits for one (issue 9): now that it may have
        # one, its report goes out at once rather than at the next hourly run. Patched: histories
        # recorded before this step learned customers without it.
        if customer is not None and workflow.patched("report-once-a-customer-is-learned"):
            await run_db_activity(
                StripeReportContract.start_stripe_reports,
                StartStripeReportsInput(org_ids=[self._org_id], hour=hour_key(workflow.now())),
            )

    async def _flush_marks(self) -> None:
        """Mark the processed webhook events in PostgreSQL, in one transaction for the batch."""
        if not self._unmarked:
            return
        outcomes, self._unmarked = self._unmarked, {}
        await run_db_activity(
            PaymentContract.mark_webhook_events,
            MarkWebhookEventsInput(org_id=self._org_id, outcomes=outcomes),
        )

    # ---------------------------------------------------------------- visibility

    def _upsert_payment_status(self) -> None:
        """Keep the BillingOrgId and PaymentStatus search attributes current (only when they change)."""
        current = workflow.info().typed_search_attributes
        updates = []
        if current.get(ORG_ID) != self._org_id:
            updates.append(ORG_ID.value_set(self._org_id))
        if current.get(PAYMENT_STATUS) != self._state.payment_status:
            updates.append(PAYMENT_STATUS.value_set(self._state.payment_status))
        if updates:
            workflow.upsert_search_attributes(updates)

    def _show_details(self) -> None:
        s = self._state
        why = f": {s.status_reasons[0]}" if s.status_reasons and s.payment_status != "ok" else ""
        last = f"; last: {self._last_outcome}" if self._last_outcome else ""
        workflow.set_current_details(
            f"{s.payment_status}{why}; plan {s.plan}; {self._events_applied} events applied{last}"
        )


async def _stripe_activity(activity: ActivityMethod[ArgT, ResultT], arg: ArgT) -> ResultT:
    """A Stripe call: retried with backoff on 429/5xx/timeouts, given up on after STRIPE_GIVE_UP."""
    return await workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=STRIPE_TIMEOUT,
        schedule_to_close_timeout=STRIPE_GIVE_UP,
        retry_policy=STRIPE_RETRY,
    )


def _cause(exc: ActivityError) -> str:
    cause = exc.cause or exc
    return str(cause.message if hasattr(cause, "message") else cause)[:300]
