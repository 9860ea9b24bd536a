"""Models of the org-billing workflow (workflows/org_billing.py): its input, signals, query and activities.

Everything here crosses a Temporal boundary, so it is small: one org's state and a bounded queue of
small events, never tables. The payment state itself (`PaymentState`) and the event (`BillingEvent`)
are the reducer's own models (billing/domain/payment_state.py, billing/domain/stripe_events.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from billing.domain.months import MONTH_PATTERN
from billing.domain.payment_state import (
    OperatorAction,
    OperatorBlock,
    PaymentState,
    PaymentStatus,
    RecentEvent,
    StripeRefusal,
)
from billing.domain.plans import Plan
from billing.domain.stripe_events import BillingEvent, InvoiceKind
from billing.models import Model

# Events processed per run before continuing as new (the workflow also continues when Temporal suggests
# it). An event applied alone costs about ten history events (signal, two workflow tasks, one activity);
# a burst applied in one workflow task shares them (issue 14: about four per event in bench.webhooks).
DEFAULT_MAX_EVENTS_PER_RUN = 200
MAX_REASON_LENGTH = 500


class OperatorRequest(Model):
    """`billing block` / `billing unblock`: why, and an id that makes a retried update apply once."""

    reason: str = Field(min_length=1, max_length=MAX_REASON_LENGTH, pattern=r"\S")
    request_id: str = Field(default="", max_length=100)


class QueuedSignal(Model):
    """A signal waiting in the workflow's queue (carried into the next run by continue-as-new)."""

    kind: Literal["stripe_event", "operator_block", "operator_unblock"]
    event: BillingEvent | None = None
    operator: OperatorRequest | None = None


class OrgBillingInput(Model):
    """Start (or continue) `org-billing/{org_id}`.

    A fresh start has `state=None`: the workflow then reads the org's plan, subscription, pending plan
    and period end from `organization_billing` first, so it never overwrites them with defaults.
    """

    org_id: str
    state: PaymentState | None = None
    queue: list[QueuedSignal] = Field(default_factory=list)
    unmarked: dict[str, str] = Field(
        default_factory=dict, description="webhook event id -> outcome, not yet marked in PostgreSQL"
    )
    events_applied: int = Field(default=0, description="signals processed by all runs so far")
    max_events_per_run: int = Field(default=DEFAULT_MAX_EVENTS_PER_RUN, ge=1)
    operator_request_ids: list[str] = Field(default_factory=list)


class FailedInvoice(Model):
    """An open payment failure, as the `state` query shows it."""

    invoice_id: str
    kind: InvoiceKind
    reason: str
    created: int
    event_id: str


class OrgBillingView(Model):
    """The `state` query: the state machine's view of one org."""

    org_id: str
    plan: Plan
    payment_status: PaymentStatus
    status_reasons: list[str]
    failed_invoices: list[FailedInvoice]
    pending_plan: Plan | None
    period_end: int | None
    subscription_id: str | None
    operator_block: OperatorBlock | None
    operator_actions: list[OperatorAction]
    recent_events: list[RecentEvent]
    last_stripe_refusal: StripeRefusal | None
    stripe_refusals: list[StripeRefusal]
    events_applied: int
    queued: int
    run_events: int
    operator_request_ids: list[str]


# --------------------------------------------------------------------------------------------------
# Activities


class OrgRef(Model):
    """One organization."""

    org_id: str


class OrgBillingRow(Model):
    """What `organization_billing` says about an org before its workflow first ran."""

    found: bool
    plan: Plan = "free"
    pending_plan: Plan | None = None
    period_end: int | None = None
    subscription_id: str | None = None
    payment_status: PaymentStatus = "ok"
    payment_status_reason: str | None = None
    stripe_customer_id: str | None = None


class BillingColumns(Model):
    """The `organization_billing` columns the org workflow owns: its view of them.

    (The SQL function ``sync_org_billing``, in a checksummed migration, takes them one by one.)
    """

    plan: Plan
    pending_plan: Plan | None
    period_end: int | None
    subscription_id: str | None
    payment_status: PaymentStatus
    payment_status_reason: str | None


BILLING_COLUMNS: tuple[str, ...] = tuple(BillingColumns.model_fields)


class SyncOrgBillingInput(BillingColumns):
    """Write the workflow's view to `organization_billing`; recompute quota flags for `month`.

    Only the ``columns`` the workflow changed are written (a missing row is created whole), so a
    plan an operator set meanwhile is not overwritten by an unrelated payment event.
    """

    org_id: str
    columns: list[str] = list(BILLING_COLUMNS)
    recompute_quota: bool
    month: str = Field(pattern=MONTH_PATTERN)
    stripe_customer_id: str | None = Field(
        default=None,
        description="a Stripe customer learned from an event: recorded only if the org has none "
        "(and no other org has it); a recorded customer is never re-pointed",
    )
    marks: dict[str, str] = Field(
        default_factory=dict,
        description="webhook event id -> outcome: events whose effects this write carries, marked applied "
        "in the same transaction (issue 14; empty in histories recorded before)",
    )


class SyncOrgBillingResult(Model):
    """How many quota flags the org has after the sync, and how many webhook events it marked."""

    flags: int
    marked: int = 0


class SubscriptionChange(Model):
    """Schedule (or revoke) a downgrade at period end on a Stripe subscription, idempotently."""

    action: Literal["schedule_downgrade", "revoke_downgrade"]
    subscription_id: str
    idempotency_key: str
    downgrade_to: Plan = "free"
    downgrade_reason: str = "plan_payment_failed"


class StripeCallResult(Model):
    """Outcome of a Stripe call: done, or refused for good (4xx, or Stripe not configured)."""

    done: bool
    message: str


class ResolvePlanInput(Model):
    product_id: str


class ResolvePlanResult(Model):
    """The plan a product stands for (None: none derivable), with any warnings."""

    plan: Plan | None
    warnings: list[str] = Field(default_factory=list)


class ResolveInvoiceKindInput(Model):
    price_ids: list[str]


class ResolveInvoiceKindResult(Model):
    """`metered` if any price is metered; `note` explains a fallback to `plan`."""

    kind: InvoiceKind
    note: str = ""


class MarkWebhookEventsInput(Model):
    """Mark processed webhook events `applied` with how they were processed."""

    org_id: str
    outcomes: dict[str, str]


class MarkWebhookEventsResult(Model):
    marked: int
