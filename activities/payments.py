"""Activities of the org-billing workflow: one PostgreSQL transaction or one Stripe call each.

Stripe calls classify their failures the way the payment state machine needs:

* 4xx other than 429 (and 409, Stripe's "idempotency key in use") is a refusal for good: returned as a
  result (`done=False`) so the workflow records it and carries on; retrying would not help.
* 429, 409, 5xx, timeouts and dropped connections are raised: Temporal retries the activity, with the
  same Idempotency-Key, so a call whose answer was lost is executed once by Stripe.

Without STRIPE_API_KEY every Stripe call is a refusal with a message saying so (nothing to retry).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio import activity

from billing.adapters.stripe_client import is_refusal
from billing.db.sql import query
from billing.domain.months import parse_month
from billing.domain.plans import PLANS
from billing.domain.stripe_events import plan_from_product, price_is_metered
from billing.models.contracts import PaymentContract
from billing.models.org_billing import (
    BILLING_COLUMNS,
    MarkWebhookEventsInput,
    MarkWebhookEventsResult,
    OrgBillingRow,
    OrgRef,
    ResolveInvoiceKindInput,
    ResolveInvoiceKindResult,
    ResolvePlanInput,
    ResolvePlanResult,
    StripeCallResult,
    SubscriptionChange,
    SyncOrgBillingInput,
    SyncOrgBillingResult,
)

log = logging.getLogger(__name__)

NO_STRIPE_KEY = "STRIPE_API_KEY is not set"


def _describe(exc: stripe.StripeError) -> str:
    message = exc.user_message or str(exc) or type(exc).__name__
    return f"HTTP {exc.http_status}: {message}" if exc.http_status else message


class PaymentActivities(PaymentContract):
    """PostgreSQL writes and Stripe calls of the payment state machine."""

    def __init__(self, pool: AsyncConnectionPool, stripe_client: stripe.StripeClient | None) -> None:
        """``stripe_client``: the worker's (billing.adapters.stripe_client), None without STRIPE_API_KEY."""
        self.pool = pool
        self.stripe = stripe_client

    # ---------------------------------------------------------------- PostgreSQL

    @activity.defn
    async def load_org_billing(self, request: OrgRef) -> OrgBillingRow:
        """The org's billing row as the dashboard or the API left it (read only)."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute(query("org_billing"), {"org_id": request.org_id})).fetchone()
        if row is None:
            return OrgBillingRow(found=False)
        period_end: datetime | None = row["period_end"]
        return OrgBillingRow(
            found=True,
            plan=row["plan"],
            pending_plan=row["pending_plan"] if row["pending_plan"] in PLANS else None,
            period_end=int(period_end.timestamp()) if period_end else None,
            subscription_id=row["stripe_subscription_id"],
            payment_status=row["payment_status"],
            payment_status_reason=row["payment_status_reason"],
            stripe_customer_id=row["stripe_customer_id"],
        )

    @activity.defn
    async def sync_org_billing(self, request: SyncOrgBillingInput) -> SyncOrgBillingResult:
        """Write the org's billing row and (if asked) recompute its quota flags, mark the webhook events
        whose effects the write carries (``marks``) applied, and record a Stripe customer learned from
        an event when the org has none: one transaction.

        The whole view is written and an event already marked is left as it is, so running it twice
        changes nothing more than running it once. Without a customer to record it is one statement in
        autocommit (one round trip, no BEGIN and COMMIT of their own).
        """
        period_end = datetime.fromtimestamp(request.period_end, UTC) if request.period_end else None
        event_ids = sorted(request.marks)
        params = {
            **request.model_dump(include=set(BILLING_COLUMNS)),
            "org_id": request.org_id,
            "period_end": period_end,
            "columns": request.columns,
            "recompute": request.recompute_quota,
            "month": parse_month(request.month),
            "event_ids": event_ids,
            "details": [request.marks[i] for i in event_ids],
        }
        async with self.pool.connection() as conn:
            if request.stripe_customer_id is None:
                await conn.set_autocommit(True)
                try:
                    row = await (await conn.execute(query("sync_org_billing"), params)).fetchone()
                finally:
                    await conn.set_autocommit(False)
            else:
                async with conn.transaction():
                    row = await (await conn.execute(query("sync_org_billing"), params)).fetchone()
                    # After sync_org_billing, which created the row if missing (lock order:
                    # organizations, then organization_billing).
                    await conn.execute(
                        query("record_org_customer"),
                        {"org_id": request.org_id, "customer_id": request.stripe_customer_id},
                    )
        assert row is not None
        return SyncOrgBillingResult(flags=row["flags"], marked=row["marked"])

    @activity.defn
    async def mark_webhook_events(self, request: MarkWebhookEventsInput) -> MarkWebhookEventsResult:
        """Mark webhook events processed by the org workflow (a redelivery is then answered at once).

        One statement in autocommit: one transaction, one round trip.
        """
        ids = sorted(request.outcomes)
        async with self.pool.connection() as conn:
            await conn.set_autocommit(True)
            try:
                cursor = await conn.execute(
                    query("webhook_mark_applied"),
                    {
                        "org_id": request.org_id,
                        "event_ids": ids,
                        "details": [request.outcomes[i] for i in ids],
                    },
                )
            finally:
                await conn.set_autocommit(False)
        return MarkWebhookEventsResult(marked=cursor.rowcount)

    # ---------------------------------------------------------------- Stripe

    @activity.defn
    async def change_stripe_subscription(self, request: SubscriptionChange) -> StripeCallResult:
        """Schedule or revoke a downgrade at period end, with the effect's Idempotency-Key.

        Revoking only undoes our own downgrade (metadata `downgrade_reason` still ours): a cancellation
        the customer asked for is not ours to withdraw.
        """
        if self.stripe is None:
            return StripeCallResult(done=False, message=f"{NO_STRIPE_KEY}: {request.action} skipped")
        subscriptions = self.stripe.v1.subscriptions
        options: Any = {"idempotency_key": request.idempotency_key}
        try:
            if request.action == "schedule_downgrade":
                await subscriptions.update_async(
                    request.subscription_id,
                    {
                        "cancel_at_period_end": True,
                        "metadata": {
                            "downgrade_to": request.downgrade_to,
                            "downgrade_reason": request.downgrade_reason,
                        },
                    },
                    options,
                )
                return StripeCallResult(done=True, message=f"downgrade to {request.downgrade_to} scheduled")
            current = await subscriptions.retrieve_async(request.subscription_id)
            metadata = current.to_dict().get("metadata") or {}
            if metadata.get("downgrade_reason") != request.downgrade_reason:
                return StripeCallResult(
                    done=True, message="no downgrade of ours on the subscription; nothing to revoke"
                )
            await subscriptions.update_async(
                request.subscription_id,
                {"cancel_at_period_end": False, "metadata": {"downgrade_to": "", "downgrade_reason": ""}},
                options,
            )
            return StripeCallResult(done=True, message="downgrade revoked")
        except stripe.StripeError as exc:
            if not is_refusal(exc):
                raise
            log.warning(
                "Stripe refused %s of %s: %s", request.action, request.subscription_id, _describe(exc)
            )
            return StripeCallResult(done=False, message=_describe(exc))

    @activity.defn
    async def resolve_plan(self, request: ResolvePlanInput) -> ResolvePlanResult:
        """The plan a Stripe product stands for: its metadata `plan`, else `team`/`pro` in its name."""
        if self.stripe is None:
            return ResolvePlanResult(
                plan=None, warnings=[f"{NO_STRIPE_KEY}: product {request.product_id} not read"]
            )
        try:
            product = await self.stripe.v1.products.retrieve_async(request.product_id)
        except stripe.StripeError as exc:
            if not is_refusal(exc):
                raise
            return ResolvePlanResult(plan=None, warnings=[f"product {request.product_id}: {_describe(exc)}"])
        warnings: list[str] = []
        plan = plan_from_product(product.to_dict(), warnings)
        return ResolvePlanResult(plan=plan, warnings=warnings)

    @activity.defn
    async def resolve_invoice_kind(self, request: ResolveInvoiceKindInput) -> ResolveInvoiceKindResult:
        """`metered` if any of the prices is metered or has a meter, else `plan`.

        A price that cannot be read (Stripe not configured, or a 4xx) counts as not metered, and the note
        says so: the failure is then treated as a plan failure, the contract's default for an invoice.
        """
        if self.stripe is None:
            return ResolveInvoiceKindResult(
                kind="plan", note=f"{NO_STRIPE_KEY}: prices not read, taken as plan"
            )
        unreadable: list[str] = []
        for price_id in request.price_ids:
            try:
                price = await self.stripe.v1.prices.retrieve_async(price_id)
            except stripe.StripeError as exc:
                if not is_refusal(exc):
                    raise
                unreadable.append(f"{price_id} ({_describe(exc)})")
                continue
            if price_is_metered(price.to_dict()):
                return ResolveInvoiceKindResult(kind="metered")
        note = f"unreadable prices taken as plan: {', '.join(unreadable)}" if unreadable else ""
        return ResolveInvoiceKindResult(kind="plan", note=note)
