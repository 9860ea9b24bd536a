"""A worker process killed outright mid-report, and ``billing reconcile`` after it (both as processes)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.core.config import Settings
from billing.models.stripe_report import StripeReportResult
from billing.orchestration.temporal import start_stripe_reports
from billing.testing.stripe_server import FakeStripe
from tests.conftest import VENV_BIN
from tests.factories import make_org
from tests.report_support import (
    FAST,
    TEST_KEY,
    counted_identifiers,
    meter_event_requests,
    outbox,
    pro_org_with_customer,
    queue_rows,
    stripe_settings,
    this_hour,
)

ROOT = Path(__file__).resolve().parent.parent


def _env(settings: Settings, fake: FakeStripe | None) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.require_database_url(),
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "BILLING_TASK_QUEUE": settings.task_queue,
    }
    env.pop("STRIPE_API_KEY", None)
    env.pop("STRIPE_API_BASE", None)
    if fake is not None:
        env |= {"STRIPE_API_KEY": TEST_KEY, "STRIPE_API_BASE": fake.url}
    return env


@contextmanager
def _worker_process(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``python worker.py`` as its own process; stopped (if still alive) when the block ends."""
    process = subprocess.Popen(
        [sys.executable, "worker.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _hold_meter_event_call(fake: FakeStripe, number: int) -> tuple[threading.Event, threading.Event]:
    """Hold the ``number``-th meter-event call inside Stripe (before Stripe processes it) until the
    second event is set; the first is set when it arrives. A held call, not a slow one: the test
    decides when it ends, so no kill has to beat a timer."""
    arrived, release = threading.Event(), threading.Event()
    handle = fake._handle
    seen = itertools.count(1)

    def held(req: Any) -> Any:
        if req.path == "/v1/billing/meter_events" and next(seen) == number:
            arrived.set()
            release.wait(120)
        return handle(req)

    fake._handle = held  # type: ignore[method-assign]
    return arrived, release


async def _statuses(pool: AsyncConnectionPool, org_id: str) -> list[str]:
    return [row["status"] for row in await outbox(pool, org_id)]


async def _counted(fake: FakeStripe) -> int:
    return len(counted_identifiers(fake))


async def _until(read: Any, done: Any, what: str, seconds: float = 60) -> None:
    """Wait for a condition the product guarantees (bounded; polled, never a fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not done(value := await read()):
        assert asyncio.get_running_loop().time() < deadline, f"waited {seconds} s for {what}; last {value!r}"
        await asyncio.sleep(0.05)


async def _reconcile_cli(
    settings: Settings, fake: FakeStripe | None, *args: str
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(VENV_BIN / "billing"), "reconcile", *args],
        env=_env(settings, fake),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_worker_killed_mid_report_and_restarted_counts_every_row_once_and_reconciles(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        identifiers = await queue_rows(pool, org.id, [1, 2, 3, 4, 5, 6], hour=hour)
        settings = stripe_settings(database_url, client, fake)
        # Rows 1 and 2 are counted and recorded, each in its own short transaction; row 3 is inside
        # Stripe when the worker dies (its call is held, not timed, until after the kill), with rows 4-6
        # claimed under the same lease.
        arrived, release = _hold_meter_event_call(fake, number=3)
        env = _env(settings, fake)
        try:
            with _worker_process(env) as first:
                starts = await start_stripe_reports(client, settings.task_queue, [org.id], hour, tuning=FAST)
                assert await asyncio.to_thread(arrived.wait, 60), "the third call never reached Stripe"
                # Row 2's outcome is recorded while call 3 runs: wait for it, then kill.
                await _until(
                    lambda: _statuses(pool, org.id), lambda s: s[:2] == ["sent"] * 2, "rows 1-2 recorded"
                )
                first.send_signal(signal.SIGKILL)
                first.wait()
            assert first.returncode == -signal.SIGKILL
            # What was recorded stays; the rest waits for the dead worker's lease to expire.
            assert await _statuses(pool, org.id) == ["sent"] * 2 + ["sending"] * 4
        finally:
            release.set()  # Stripe finishes the dead client's call: row 3 is counted once, unanswered
        await _until(lambda: _counted(fake), lambda n: n == 3, "Stripe to count the held call")
        assert await asyncio.to_thread(fake.wait_idle, 30)
        assert counted_identifiers(fake) == identifiers[:3]

        with _worker_process(env):
            handle = client.get_workflow_handle(starts.workflow_ids[0], result_type=StripeReportResult)
            result = await asyncio.wait_for(handle.result(), 60)
        assert await asyncio.to_thread(fake.wait_idle, 30), "a Stripe call still in flight"

        assert counted_identifiers(fake) == identifiers
        assert fake.total(customer, "agent_tasks") == 21
        requests = meter_event_requests(fake)
        # Only the row in flight at the kill was sent twice (same identifier, next key): counted once.
        assert [requests.count(i) for i in identifiers] == [1, 1, 2, 1, 1, 1]
        rows = await outbox(pool, org.id)
        assert [r["status"] for r in rows] == ["sent"] * 6
        assert [r["stripe_response"].get("deduplicated") for r in rows] == [
            None,
            None,
            True,
            None,
            None,
            None,
        ]
        assert result.sent == 6
        assert result.pending == 0

        month = f"{hour:%Y-%m}"
        matched = await _reconcile_cli(settings, fake, org.id, "--month", month)
        assert matched.returncode == 0, matched.stderr
        lines = matched.stdout.splitlines()
        assert lines[0] == f"org {org.id}, customer {customer}, {month} (ledger = sent reports)"
        assert lines[1:] == [
            "  meter                          ledger         stripe   difference",
            "  agent_tasks                        21             21           +0",
            "  agentic_skill_search                0              0           +0",
            "  fast_skill_search                   0              0           +0",
            "  skill_blocks                        0              0           +0",
            "  storage_gb_hour                     0              0           +0",
            "all meters match",
            f"  queued for {month}: sent 21 (6)",
        ]

        # An event that bypassed the outbox: Stripe counts 5 more than the ledger sent.
        raw = stripe.StripeClient(TEST_KEY, base_addresses={"api": fake.url}, max_network_retries=0)
        raw.v1.billing.meter_events.create(
            {
                "event_name": "agent_tasks",
                "identifier": "out-of-band-1",
                "timestamp": int(hour.timestamp()),
                "payload": {"stripe_customer_id": customer, "value": "5"},
            }
        )
        differs = await _reconcile_cli(settings, fake, org.id, "--month", month, "--json")
        assert differs.returncode == 1, differs.stderr
        report = json.loads(differs.stdout)
        assert report["matches"] is False
        by_meter = {m["event_name"]: m for m in report["meters"]}
        assert (by_meter["agent_tasks"]["ledger"], by_meter["agent_tasks"]["stripe"]) == (21, 26)
        assert by_meter["agent_tasks"]["difference"] == 5
        assert {m["difference"] for name, m in by_meter.items() if name != "agent_tasks"} == {0}


async def test_reconcile_refuses_clearly_without_a_key_or_a_customer(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    with FakeStripe() as fake:
        settings = stripe_settings(database_url, client, fake)
        nameless = await make_org(pool, plan="pro")
        no_key = await _reconcile_cli(settings, None, nameless.id, "--month", "2026-01")
        no_customer = await _reconcile_cli(settings, fake, nameless.id, "--month", "2026-01")
        bad_month = await _reconcile_cli(settings, fake, nameless.id, "--month", "2026-13")
    assert (no_key.returncode, no_key.stderr) == (
        2,
        "billing: error: STRIPE_API_KEY: not set (reconcile compares the ledger with Stripe)\n",
    )
    assert (no_customer.returncode, no_customer.stderr) == (
        2,
        f"billing: error: organization {nameless.id} has no stripe_customer_id: nothing was sent to compare\n",
    )
    assert bad_month.returncode == 2
    assert "expected a month as YYYY-MM, got '2026-13'" in bad_month.stderr


async def test_billing_report_pending_starts_the_backlog_now(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    from tests.conftest import running_worker

    with FakeStripe() as fake:
        customer = fake.add_customer()
        org = await make_org(pool, plan="team", stripe_customer_id=customer)
        identifiers = await queue_rows(pool, org.id, [8, 9], hour=hour)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            done = await asyncio.to_thread(
                subprocess.run,
                [str(VENV_BIN / "billing"), "report-pending", "--org", org.id, "--json"],
                env=_env(settings, fake),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            output = json.loads(done.stdout)
            assert (output["orgs"], output["started"]) == (1, 1)
            handle = client.get_workflow_handle(output["workflow_ids"][0], result_type=StripeReportResult)
            result = await handle.result()
        assert result.sent == 2
        assert counted_identifiers(fake) == identifiers


async def test_reconcile_exits_1_when_only_unsettled_units_differ_though_every_meter_matches(
    pool: AsyncConnectionPool, client: Client, database_url: str
) -> None:
    """Stripe has exactly what was sent, but a queued row is still pending: the month is not settled."""
    from tests.conftest import running_worker
    from tests.report_support import report

    hour = this_hour()  # read once: a test that crosses hh:00 still means one hour
    month = f"{hour:%Y-%m}"
    with FakeStripe() as fake:
        org, customer = await pro_org_with_customer(pool, fake)
        (sent,) = await queue_rows(pool, org.id, [3], hour=hour)
        settings = stripe_settings(database_url, client, fake)
        async with running_worker(settings, pool, client):
            result = await report(client, settings, org.id, hour=hour)
        assert (result.sent, result.pending) == (1, 0)
        # Queued after the report ran (no report has taken it yet): pending.
        (waiting,) = await queue_rows(pool, org.id, [4], hour=hour)
        assert [(r["identifier"], r["status"]) for r in await outbox(pool, org.id)] == [
            (sent, "sent"),
            (waiting, "pending"),
        ]
        assert counted_identifiers(fake) == [sent]
        text = await _reconcile_cli(settings, fake, org.id, "--month", month)
        as_json = await _reconcile_cli(settings, fake, org.id, "--month", month, "--json")
    assert text.returncode == 1, text.stderr
    assert text.stderr == ""
    assert text.stdout.splitlines() == [
        f"org {org.id}, customer {customer}, {month} (ledger = sent reports)",
        "  meter                          ledger         stripe   difference",
        "  agent_tasks                         3              3           +0",
        "  agentic_skill_search                0              0           +0",
        "  fast_skill_search                   0              0           +0",
        "  skill_blocks                        0              0           +0",
        "  storage_gb_hour                     0              0           +0",
        "all meters match",
        f"  queued for {month}: pending 4 (1), sent 3 (1)",
        "  4 queued units are neither sent nor voided",
    ]
    assert as_json.returncode == 1, as_json.stderr
    data = json.loads(as_json.stdout)
    assert {m["difference"] for m in data["meters"]} == {0}
    assert (data["unsettled_units"], data["matches"]) == (4, False)
    assert data["queued"] == [
        {"state": "pending", "reports": 1, "quantity": 4},
        {"state": "sent", "reports": 1, "quantity": 3},
    ]
