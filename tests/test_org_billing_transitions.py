"""Every transition of the payment state machine, end to end: signed Stripe payloads in both invoice
shapes posted to POST /v1/stripe/webhook, the org-billing workflow on the dev server, PostgreSQL and
FakeStripe asserted exactly. Every event is delivered three times."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.core.clock import current_month
from billing.domain.ids import stripe_report_id
from billing.models.stripe_report import StorageOverageInput, StorageOverageResult, StripeReportResult
from billing.testing import stripe_payloads as sp
from billing.testing.stripe_server import FakeStripe
from tests.report_support import (
    FAST,
    counted_identifiers,
    meter_event_requests,
    outbox,
    queue_rows,
    this_hour,
)
from tests.usage_support import ALL_TAGS
from tests.webhook_support import T0, add_usage, customer_of, harness, paid_org, subscription_of

TAGS = ALL_TAGS  # every meter the migrations seed
SHAPES = ("old", "new")


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


def _blocked_flags(project_ids: list[str]) -> set[tuple[str, str, str]]:
    return {(p, tag, "payment_blocked") for p in project_ids for tag in TAGS}


def _invoice(org_id: str, shape: str, **kwargs: object) -> dict:
    return sp.invoice(
        shape=shape,  # type: ignore[arg-type]
        customer_id=customer_of(org_id),
        subscription_id=subscription_of(org_id),
        organization_id=org_id,
        **kwargs,  # type: ignore[arg-type]
    )


def _seed_subscription(fake: FakeStripe, org_id: str, status: str = "active") -> None:
    fake.add_customer(customer_of(org_id))
    fake.add_subscription(
        customer_of(org_id),
        id=subscription_of(org_id),
        status=status,
        items=[{"price": "price_pro_monthly", "product": "prod_pro"}],
        metadata={"organization_id": org_id, "plan": "pro"},
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("how", ["threshold", "metered_price"])
async def test_metered_failure_blocks_every_tag_and_payment_recomputes_from_usage(
    shape: str, how: str, database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    org = await paid_org(pool, plan="free")
    await add_usage(pool, org.project_ids[0], "task.created", 1_500, current_month())
    if how == "threshold":
        inv = _invoice(org.id, shape, billing_reason="subscription_threshold")
    else:
        metered = sp.price("price_usage_metered", product="prod_usage", with_meter=True)
        fake.add_price("price_usage_metered", "prod_usage", meter="mtr_test_agent_tasks")
        inv = _invoice(org.id, shape, prices=[sp.price(), metered])
    async with harness(database_url, pool, client, fake=fake) as h:
        await h.deliver(sp.invoice_event("invoice.payment_failed", inv, created=T0), times=3)
        view = await h.settle(org.id)
        assert view.payment_status == "blocked"
        assert [(f.invoice_id, f.kind) for f in view.failed_invoices] == [(inv["id"], "metered")]
        row = await h.billing_row(org.id)
        assert row["payment_status"] == "blocked"
        assert row["payment_status_reason"] == f"metered invoice {inv['id']} payment failed (attempt 1)"
        assert await h.flags(org.id) == _blocked_flags(org.project_ids)

        await h.deliver(sp.invoice_event("invoice.paid", inv, created=T0 + 60), times=3)
        view = await h.settle(org.id)
        assert view.payment_status == "ok"
        assert view.failed_invoices == []
        row = await h.billing_row(org.id)
        assert (row["payment_status"], row["payment_status_reason"], row["plan"]) == ("ok", None, "free")
        # Lifted: flags follow usage again (free plan, 1,500 tasks > 1,000 included, org-wide).
        assert await h.flags(org.id) == {(p, "task.created", "over_limit") for p in org.project_ids}
        assert {e.outcome for e in view.recent_events} == {"applied"}
        assert set((await h.webhook_rows(org.id)).values()) == {("applied", "applied")}
        assert fake.request_counts[f"/v1/subscriptions/{subscription_of(org.id)}"] == 0


@pytest.mark.parametrize("shape", SHAPES)
async def test_plan_failure_schedules_the_downgrade_once_and_payment_revokes_it(
    shape: str, database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    org = await paid_org(pool, plan="pro")
    _seed_subscription(fake, org.id)
    fake.add_price("price_pro_monthly", "prod_pro")
    sub_path = f"/v1/subscriptions/{subscription_of(org.id)}"
    inv = _invoice(org.id, shape, finalization_error="Your card was declined.")
    async with harness(database_url, pool, client, fake=fake) as h:
        failed = sp.invoice_event("invoice.payment_failed", inv, created=T0)
        await h.deliver(failed, times=3)
        view = await h.settle(org.id)
        assert (view.payment_status, view.plan, view.pending_plan) == ("past_due", "pro", "free")
        assert [(f.invoice_id, f.kind) for f in view.failed_invoices] == [(inv["id"], "plan")]
        row = await h.billing_row(org.id)
        assert (row["payment_status"], row["pending_plan"], row["plan"]) == ("past_due", "free", "pro")
        assert row["payment_status_reason"] == (
            f"plan invoice {inv['id']} payment failed (attempt 1): Your card was declined."
        )
        assert await h.flags(org.id) == set()
        sub = fake.get_subscription(subscription_of(org.id))
        assert sub["cancel_at_period_end"] is True
        assert sub["metadata"] == {
            "organization_id": org.id,
            "plan": "pro",
            "downgrade_to": "free",
            "downgrade_reason": "plan_payment_failed",
        }
        posts = [r for r in fake.requests if r.method == "POST" and r.path == sub_path]
        assert [r.idempotency_key for r in posts] == [f"downgrade:{failed['id']}"]
        # The newer shape names the price by id only: its usage type was read from Stripe.
        assert fake.request_counts["/v1/prices/price_pro_monthly"] == (1 if shape == "new" else 0)

        paid = sp.invoice_event("invoice.payment_succeeded", inv, created=T0 + 3600)
        await h.deliver(paid, times=3)
        view = await h.settle(org.id)
        assert (view.payment_status, view.plan, view.pending_plan) == ("ok", "pro", None)
        row = await h.billing_row(org.id)
        assert (row["payment_status"], row["pending_plan"], row["payment_status_reason"]) == (
            "ok",
            None,
            None,
        )
        sub = fake.get_subscription(subscription_of(org.id))
        assert sub["cancel_at_period_end"] is False
        assert sub["metadata"] == {"organization_id": org.id, "plan": "pro"}
        posts = [r for r in fake.requests if r.method == "POST" and r.path == sub_path]
        assert [r.idempotency_key for r in posts] == [
            f"downgrade:{failed['id']}",
            f"revoke-downgrade:{paid['id']}",
        ]


@pytest.mark.parametrize("shape", SHAPES)
async def test_subscription_lifecycle_sets_plan_period_end_pending_plan_and_resets(
    shape: str, database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    org = await paid_org(pool, plan="free")
    await add_usage(pool, org.project_ids[1], "space.learned", 150, current_month())
    sub_id = subscription_of(org.id)
    common = {
        "shape": shape,
        "subscription_id": sub_id,
        "customer_id": customer_of(org.id),
        "organization_id": org.id,
    }
    fake.add_product("Acme Team", id="prod_acme_team", metadata={"plan": "team"})
    async with harness(database_url, pool, client, fake=fake) as h:
        # Created on pro (metadata plan): plan, subscription and period end synced; flags follow pro.
        await h.deliver(
            sp.subscription_event(
                "customer.subscription.created",
                sp.subscription(**common, plan="pro", current_period_end=T0 + 86_400),
                created=T0,
            ),
            times=3,
        )
        await h.settle(org.id)
        assert await h.billing_row(org.id) == {
            "plan": "pro",
            "pending_plan": None,
            "payment_status": "ok",
            "payment_status_reason": None,
            "stripe_subscription_id": sub_id,
            "period_end": T0 + 86_400,
        }
        assert await h.flags(org.id) == set()

        # No plan in metadata (and an invalid one ignored): the product, retrieved from Stripe, says team.
        team_price = sp.price("price_acme_team", product="prod_acme_team")
        await h.deliver(
            sp.subscription_event(
                "customer.subscription.updated",
                sp.subscription(
                    **common,
                    plan=None,
                    downgrade_to="gold",
                    plan_price=team_price,
                    current_period_end=T0 + 2 * 86_400,
                ),
                created=T0 + 10,
            ),
            times=3,
        )
        view = await h.settle(org.id)
        assert (view.plan, view.period_end) == ("team", T0 + 2 * 86_400)
        assert fake.request_counts["/v1/products/prod_acme_team"] == 1

        # Scheduled cancellation: period end and subscription still synced, pending plan = downgrade_to.
        await h.deliver(
            sp.subscription_event(
                "customer.subscription.updated",
                sp.subscription(
                    **common,
                    plan="team",
                    downgrade_to="pro",
                    cancel_at_period_end=True,
                    current_period_end=T0 + 3 * 86_400,
                ),
                created=T0 + 20,
            ),
            times=3,
        )
        await h.settle(org.id)
        row = await h.billing_row(org.id)
        assert (row["plan"], row["pending_plan"], row["stripe_subscription_id"], row["period_end"]) == (
            "team",
            "pro",
            sub_id,
            T0 + 3 * 86_400,
        )

        # An older update arriving late changes nothing.
        await h.deliver(
            sp.subscription_event(
                "customer.subscription.updated", sp.subscription(**common, plan="pro"), created=T0 + 15
            ),
            times=3,
        )
        view = await h.settle(org.id)
        assert view.recent_events[-1].outcome == "stale"
        assert (await h.billing_row(org.id))["plan"] == "team"

        # Deleted: the plan resets to downgrade_to; subscription and period end cleared; free flags back.
        await h.deliver(
            sp.subscription_event(
                "customer.subscription.deleted",
                sp.subscription(**common, plan="team", downgrade_to="pro", status="canceled"),
                created=T0 + 30,
            ),
            times=3,
        )
        await h.settle(org.id)
        assert await h.billing_row(org.id) == {
            "plan": "pro",
            "pending_plan": None,
            "payment_status": "ok",
            "payment_status_reason": None,
            "stripe_subscription_id": None,
            "period_end": None,
        }

        # A new subscription on free... then deleted without downgrade_to: plan free, usage flags back.
        await h.deliver(
            sp.subscription_event(
                "customer.subscription.created",
                sp.subscription(**{**common, "subscription_id": sub_id + "b"}, plan="pro"),
                created=T0 + 40,
            )
        )
        await h.deliver(
            sp.subscription_event(
                "customer.subscription.deleted",
                sp.subscription(**{**common, "subscription_id": sub_id + "b"}, plan="pro", status="canceled"),
                created=T0 + 50,
            )
        )
        await h.settle(org.id)
        assert (await h.billing_row(org.id))["plan"] == "free"
        assert await h.flags(org.id) == {(p, "space.learned", "over_limit") for p in org.project_ids}


async def test_subscription_schedules_set_and_clear_the_pending_plan(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool, plan="pro")
    sub_id = subscription_of(org.id)
    ids = {"customer_id": customer_of(org.id), "subscription_id": sub_id, "organization_id": org.id}
    async with harness(database_url, pool, client) as h:
        await h.deliver(
            sp.subscription_event(
                "customer.subscription.created",
                sp.subscription(**ids, plan="pro", schedule_id="sub_sched_1"),
                created=T0,
            ),
            times=3,
        )
        await h.deliver(
            sp.schedule_event(
                "subscription_schedule.created",
                sp.subscription_schedule(**ids, next_plan="team"),
                created=T0 + 1,
            ),
            times=3,
        )
        await h.settle(org.id)
        assert (await h.billing_row(org.id))["pending_plan"] == "team"
        await h.deliver(
            sp.schedule_event(
                "subscription_schedule.released",
                sp.subscription_schedule(**ids, status="released", next_plan="team"),
                created=T0 + 2,
            ),
            times=3,
        )
        await h.settle(org.id)
        row = await h.billing_row(org.id)
        assert (row["plan"], row["pending_plan"]) == ("pro", None)


async def test_uncollectible_opens_a_plan_failure_and_voided_clears_it_without_stripe_key(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool, plan="pro")
    inv = _invoice(org.id, "old")
    async with harness(database_url, pool, client) as h:
        await h.deliver(sp.invoice_event("invoice.marked_uncollectible", inv, created=T0), times=3)
        view = await h.settle(org.id)
        assert (view.payment_status, view.pending_plan) == ("past_due", "free")
        # Without STRIPE_API_KEY the downgrade cannot be sent: recorded and shown, not retried.
        assert view.last_stripe_refusal is not None
        assert view.last_stripe_refusal.message == "STRIPE_API_KEY is not set: schedule_downgrade skipped"
        row = await h.billing_row(org.id)
        assert (row["payment_status"], row["pending_plan"]) == ("past_due", "free")
        assert row["payment_status_reason"] == (
            f"plan invoice {inv['id']} marked uncollectible; Stripe refused downgrade of "
            f"{subscription_of(org.id)}: STRIPE_API_KEY is not set: schedule_downgrade skipped"
        )
        await h.deliver(sp.invoice_event("invoice.voided", inv, created=T0 + 5), times=3)
        view = await h.settle(org.id)
        assert (view.payment_status, view.pending_plan, view.failed_invoices) == ("ok", None, [])
        row = await h.billing_row(org.id)
        assert (row["payment_status"], row["pending_plan"]) == ("ok", None)


@pytest.mark.parametrize("shape", SHAPES)
async def test_out_of_order_deliveries(
    shape: str, database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    org = await paid_org(pool, plan="pro")
    _seed_subscription(fake, org.id)
    fake.add_price("price_pro_monthly", "prod_pro")
    first = _invoice(org.id, shape)
    metered = _invoice(org.id, shape, billing_reason="subscription_threshold")
    plan = _invoice(org.id, shape)
    async with harness(database_url, pool, client, fake=fake) as h:
        # Success delivered before the failure of the same invoice: the failure is stale.
        await h.deliver(sp.invoice_event("invoice.paid", first, created=T0 + 5), times=3)
        await h.deliver(sp.invoice_event("invoice.payment_failed", first, created=T0), times=3)
        view = await h.settle(org.id)
        assert view.payment_status == "ok"
        assert [e.outcome for e in view.recent_events] == ["applied", "stale"]
        assert (await h.billing_row(org.id))["payment_status"] == "ok"

        # Metered fails, plan fails, plan paid: still blocked.
        await h.deliver(sp.invoice_event("invoice.payment_failed", metered, created=T0 + 10), times=3)
        await h.deliver(sp.invoice_event("invoice.payment_failed", plan, created=T0 + 20), times=3)
        view = await h.settle(org.id)
        assert view.payment_status == "blocked"
        assert sorted(f.kind for f in view.failed_invoices) == ["metered", "plan"]
        await h.deliver(sp.invoice_event("invoice.paid", plan, created=T0 + 30), times=3)
        view = await h.settle(org.id)
        assert view.payment_status == "blocked"
        assert [(f.invoice_id, f.kind) for f in view.failed_invoices] == [(metered["id"], "metered")]
        assert (await h.billing_row(org.id))["payment_status"] == "blocked"
        assert await h.flags(org.id) == _blocked_flags(org.project_ids)
        await h.deliver(sp.invoice_event("invoice.paid", metered, created=T0 + 40), times=3)
        await h.settle(org.id)
        assert (await h.billing_row(org.id))["payment_status"] == "ok"
        assert await h.flags(org.id) == set()


async def test_a_payment_event_does_not_overwrite_a_plan_an_operator_set_meanwhile(
    database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    org = await paid_org(pool, plan="pro")
    first = _invoice(org.id, "new", billing_reason="subscription_threshold")
    async with harness(database_url, pool, client, fake=fake) as h:
        await h.deliver(sp.invoice_event("invoice.payment_failed", first, created=T0))
        await h.settle(org.id)
        # The operator moves the org to team straight in the database (as the dashboard may).
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE organization_billing SET plan = 'team' WHERE organization_id = %s", [org.id]
            )
        await h.deliver(sp.invoice_event("invoice.paid", first, created=T0 + 60))
        await h.settle(org.id)
        row = await h.billing_row(org.id)
    # The workflow wrote what it changed (the status and its reason), not its stale view of the plan.
    assert (row["payment_status"], row["payment_status_reason"], row["plan"]) == ("ok", None, "team")


async def test_a_cancelled_subscription_moves_the_org_to_free_and_its_queued_overage_is_still_sent_once(
    database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    """Churn: overage queued while the org was on pro was billable when queued (README, "Exactly once"
    table: plan changed to free, subscription cancelled, after the row was queued -> sent). After a
    signed `customer.subscription.deleted` moves the org to free, the next hourly job sends the
    backlog to the org's customer, every unit exactly once."""
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    org = await paid_org(pool, plan="pro")
    customer = fake.add_customer(customer_of(org.id))
    identifiers = await queue_rows(pool, org.id, [120, 30, 7], hour=hour)
    common = {"subscription_id": subscription_of(org.id), "customer_id": customer, "organization_id": org.id}
    async with harness(database_url, pool, client, fake=fake) as h:
        await h.deliver(
            sp.subscription_event("customer.subscription.created", sp.subscription(**common), created=T0)
        )
        await h.deliver(
            sp.subscription_event(
                "customer.subscription.deleted",
                sp.subscription(**common, status="canceled"),
                created=T0 + 60,
            ),
            times=2,
        )
        await h.settle(org.id)
        row = await h.billing_row(org.id)
        assert (row["plan"], row["stripe_subscription_id"]) == ("free", None)
        # Churn voided nothing and sent nothing: the backlog waits, pending, for its report.
        assert [(r["identifier"], r["status"]) for r in await outbox(pool, org.id)] == [
            (i, "pending") for i in identifiers
        ]
        assert fake.meter_events == []
        # The hourly job starts the report of every org with pending rows, a free one included.
        sweep = await client.execute_workflow(
            "StorageOverageWorkflow",
            StorageOverageInput(hour=f"{hour:%Y-%m-%dT%H}", tuning=FAST),
            id=f"storage-overage-test-{org.id}-churned",
            task_queue=h.settings.task_queue,
            result_type=StorageOverageResult,
        )
        assert (sweep.queued, sweep.reports_started) == (0, 1)  # free: no storage overage of its own
        sent = await client.get_workflow_handle(
            stripe_report_id(org.id, hour), result_type=StripeReportResult
        ).result()
    assert (sent.sent, sent.deduplicated, sent.failed, sent.pending) == (3, 0, 0, 0)
    assert counted_identifiers(fake) == identifiers
    assert meter_event_requests(fake) == identifiers  # one request each: nothing retried or resent
    assert fake.totals() == {(customer, "agent_tasks"): 157}
    assert {e["customer"] for e in fake.meter_events} == {customer}
    assert [r["status"] for r in await outbox(pool, org.id)] == ["sent"] * 3
