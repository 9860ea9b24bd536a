"""Acknowledged means enforced (issue 11, finding 6): an operator block or unblock returns only once the
billing row and the quota flags the gateway reads are committed; a Stripe-driven change of the payment
status is written before any Stripe call."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.core.clock import utcnow
from billing.domain.months import month_key
from billing.models.org_billing import OperatorRequest
from billing.orchestration.temporal import operator_update
from billing.testing import stripe_payloads as sp
from billing.testing.stripe_server import FakeStripe
from tests.api_client import AUTH
from tests.factories import Org, make_org
from tests.webhook_support import T0, Harness, add_usage, customer_of, harness, paid_org, subscription_of
from workflows.org_billing import OrgBillingWorkflow

WRITE = {"path": "/api/v1/session/s1/messages", "method": "POST"}
TAGS = 5  # meters seeded by the migrations


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


@contextlib.asynccontextmanager
async def slow_billing_write(pool: AsyncConnectionPool, org_id: str, seconds: float) -> AsyncIterator[None]:
    """Every write of this org's `organization_billing` row takes `seconds` longer (a trigger that
    sleeps), so a reply that does not wait for the commit is caught. Removed on exit."""
    name = sql.Identifier(f"test_slow_billing_{org_id.replace('-', '')}")
    async with pool.connection() as conn:
        await conn.execute(
            sql.SQL(
                "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$"
            ).format(name=name, seconds=sql.Literal(seconds))
        )
        await conn.execute(
            sql.SQL(
                "CREATE TRIGGER {name} BEFORE UPDATE ON organization_billing FOR EACH ROW"
                " WHEN (NEW.organization_id = {org}::uuid) EXECUTE FUNCTION {name}()"
            ).format(name=name, org=sql.Literal(org_id))
        )
    try:
        yield
    finally:
        async with pool.connection() as conn:
            await conn.execute(sql.SQL("DROP TRIGGER {name} ON organization_billing").format(name=name))
            await conn.execute(sql.SQL("DROP FUNCTION {name}()").format(name=name))


async def quota_answers(h: Harness, org: Org) -> list[int]:
    """The gateway's answer for a quota-consuming write, for every project of the org."""
    answers = []
    for project in org.project_ids:
        response = await h.http.get(f"/v1/projects/{project}/quota", params=WRITE, headers=AUTH)
        answers.append(response.status_code)
    return answers


async def operator(h: Harness, org: Org, action: str, reason: str) -> str:
    """What `billing block` / `billing unblock` call; returns the payment status it reports."""
    request = OperatorRequest(reason=reason, request_id=uuid.uuid4().hex)
    view = await operator_update(h.client, h.settings.task_queue, org.id, action, request)  # type: ignore[arg-type]
    return view.payment_status


async def test_block_then_quota_checks_at_once_a_hundred_times_never_answer_200(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool, plan="pro", projects=2)
    async with harness(database_url, pool, client) as h:
        answers_after_block, answers_after_unblock = [], []
        for i in range(100):
            assert await operator(h, org, "block", f"loop {i}") == "blocked"
            answers_after_block += await quota_answers(h, org)
            assert await operator(h, org, "unblock", f"loop {i}") == "ok"
            answers_after_unblock += await quota_answers(h, org)
    assert answers_after_block == [403] * 200
    assert answers_after_unblock == [200] * 200


async def test_block_and_unblock_are_enforced_when_answered_even_with_a_slow_billing_write(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool, plan="pro", projects=2)
    async with harness(database_url, pool, client) as h, slow_billing_write(pool, org.id, 1.5):
        started = time.monotonic()
        assert await operator(h, org, "block", "chargeback") == "blocked"
        # The answer waited for the delayed write (not a timing assertion on the product: a proof the
        # delay was in the path the answer waits for).
        assert time.monotonic() - started >= 1.5
        assert await quota_answers(h, org) == [403, 403]
        assert (await h.billing_row(org.id))["payment_status"] == "blocked"
        assert await operator(h, org, "unblock", "resolved") == "ok"
        assert await quota_answers(h, org) == [200, 200]
        assert ((await h.billing_row(org.id))["payment_status"], await h.flags(org.id)) == ("ok", set())


async def test_unblock_after_the_dashboard_wrote_blocked_itself_writes_ok_and_clears_the_flags(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool, plan="pro", projects=2)
    async with harness(database_url, pool, client) as h:
        # The workflow runs and believes the org is ok (it wrote ok itself).
        assert await operator(h, org, "block", "first") == "blocked"
        assert await operator(h, org, "unblock", "first") == "ok"
        # Then the dashboard writes `blocked` straight into the table, and the next sync flags it.
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE organization_billing SET payment_status = 'blocked' WHERE organization_id = %s",
                [org.id],
            )
            await conn.execute(
                "SELECT recompute_quota_flags(ARRAY[%s::uuid], %s::date)",
                [org.id, f"{month_key(utcnow())}-01"],
            )
        assert await quota_answers(h, org) == [403, 403]
        assert await operator(h, org, "unblock", "dashboard block lifted") == "ok"
        assert (await h.billing_row(org.id))["payment_status"] == "ok"
        assert await h.flags(org.id) == set()
        assert await quota_answers(h, org) == [200, 200]


async def test_a_failed_plan_invoice_is_written_before_the_downgrade_call_to_stripe(
    database_url: str, pool: AsyncConnectionPool, client: Client, fake: FakeStripe
) -> None:
    org = await paid_org(pool, plan="pro")
    fake.add_customer(customer_of(org.id))
    fake.add_subscription(
        customer_of(org.id), id=subscription_of(org.id), metadata={"organization_id": org.id, "plan": "pro"}
    )
    subscription_path = f"/v1/subscriptions/{subscription_of(org.id)}"
    # The downgrade call hangs for a while: the status must not wait for it.
    fake.slow_next(1, 5.0, path_prefix=subscription_path)
    inv = sp.invoice(
        shape="old",
        customer_id=customer_of(org.id),
        subscription_id=subscription_of(org.id),
        organization_id=org.id,
    )
    async with harness(database_url, pool, client, fake=fake) as h:
        await h.deliver(sp.invoice_event("invoice.payment_failed", inv, created=T0))
        deadline = time.monotonic() + 30
        while not any(r.path == subscription_path for r in fake.requests):
            assert time.monotonic() < deadline, "the downgrade call never reached Stripe"
            await asyncio.sleep(0.05)
        # The call is in flight (held 5 s by the fake): the row already says past_due.
        row = await h.billing_row(org.id)
        assert (row["payment_status"], row["pending_plan"]) == ("past_due", "free")
        assert fake.request_counts[subscription_path] == 1
        await h.settle(org.id)
        assert fake.wait_idle(10.0)


async def test_unblock_names_what_still_refuses_the_orgs_writes(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    from tests.test_org_billing import _billing

    org = await make_org(pool, plan="free", projects=1)
    await add_usage(pool, org.project_ids[0], "task.created", 1_500, month_key(utcnow()))
    async with harness(database_url, pool, client) as h:
        assert await operator(h, org, "block", "chargeback") == "blocked"
        unblocked = await asyncio.to_thread(_billing, h.settings, "unblock", org.id, "--reason", "paid")
        assert unblocked.returncode == 0, unblocked.stderr
        assert "still refused: 1 project flag remains: task.created (over_limit)" in unblocked.stdout
        assert await quota_answers(h, org) == [403]


def test_operator_requests_without_a_reason_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError):
        OperatorRequest(reason="   ")


async def test_the_quota_endpoint_is_reachable_with_the_harness(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    """Guard for the helpers above: an unflagged org's projects answer 200 (so a 403 means flagged)."""
    org = await paid_org(pool, plan="pro", projects=2)
    async with harness(database_url, pool, client, worker=False) as h:
        assert await quota_answers(h, org) == [200, 200]
        response = await h.http.get(f"/v1/projects/{org.project_ids[0]}/quota", params=WRITE)
        assert isinstance(response, httpx.Response) and response.status_code == 401


async def test_operator_updates_amid_continue_as_new_are_all_answered_and_enforced(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    """A run that continues as new every 2 items: updates in flight are applied before it does, so none
    is left waiting (or lost) across runs, and each answer reflects its own committed write."""
    from billing.domain.ids import org_billing_id
    from billing.models.org_billing import OrgBillingInput
    from tests.test_org_billing import _scenario

    org = await paid_org(pool, plan="pro", projects=2)
    async with harness(database_url, pool, client) as h:
        handle = await client.start_workflow(
            OrgBillingWorkflow.run,
            OrgBillingInput(org_id=org.id, max_events_per_run=2),
            id=org_billing_id(org.id),
            task_queue=h.settings.task_queue,
        )
        # Stripe events (signals) and operator updates at once.
        events = [e for e in _scenario(org.id)[:12] if e["type"] == "invoice.paid"]
        posts = [h.post(event) for event in events]
        updates = [operator(h, org, "block", f"concurrent {i}") for i in range(6)]
        results = await asyncio.gather(*posts, *updates)
        assert [r.status_code for r in results[: len(posts)]] == [200] * len(posts)
        assert results[len(posts) :] == ["blocked"] * 6
        assert await quota_answers(h, org) == [403, 403]
        assert await operator(h, org, "unblock", "done") == "ok"
        assert await quota_answers(h, org) == [200, 200]
        h.delivered |= {event["id"] for event in events}
        view = await h.settle(org.id)
        described = await client.get_workflow_handle(org_billing_id(org.id)).describe()
    assert [a.action for a in view.operator_actions] == ["block"] * 6 + ["unblock"]
    assert view.events_applied == len(events) + 7
    assert described.run_id != handle.first_execution_run_id


async def test_an_operator_request_sent_again_is_applied_once(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await paid_org(pool, plan="pro", projects=1)
    request = OperatorRequest(reason="sent twice", request_id=uuid.uuid4().hex)
    async with harness(database_url, pool, client) as h:
        first = await operator_update(h.client, h.settings.task_queue, org.id, "block", request)
        again = await operator_update(h.client, h.settings.task_queue, org.id, "block", request)
    assert (first.payment_status, again.payment_status) == ("blocked", "blocked")
    assert [a.reason for a in again.operator_actions] == ["sent twice"]
    assert again.operator_request_ids == [request.request_id]
