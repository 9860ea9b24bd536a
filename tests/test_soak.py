"""The soak (``python -m bench.soak``, issue 16) in short, and the premises its verdicts rest on.

The short run starts the system as deployed (Temporal dev server, two ``billing worker``, ``billing api``,
the test Stripe server) on a fresh database, with a fixed seed, and must end with every invariant held
under injected faults. The pure tests check what the verdicts assume: the generator replays from its
seed, the oracle (the payment reducer in order) gives the same state whatever the delivery order of the
stories it generates, and a violation exits non-zero naming the seed and the first differing org.
"""

from __future__ import annotations

import io
import random
import re
import subprocess
import sys
from datetime import date

from bench.soak import Stats, Verdict, Workload, _summary
from billing.domain.payment_state import PaymentState, apply_event
from billing.domain.stripe_events import parse_event

TODAY = date(2026, 12, 1)


def test_short_soak_holds_every_invariant_under_chaos() -> None:
    """About 40 s of workload and chaos, then the drain and every invariant (seed fixed)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seed", "16", "--minutes", "0.6", "--orgs", "6",
         "--drain-seconds", "150"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "violations: 0 (seed 16)" in done.stdout
    faults = re.search(r"faults injected: (\d+)", done.stdout)
    operations = re.search(r"operations: (\d+)", done.stdout)
    assert faults and int(faults.group(1)) > 0, done.stdout
    assert operations and int(operations.group(1)) > 50, done.stdout
    assert done.stdout.count("[ok]") == 7, done.stdout


def test_the_generator_replays_from_its_seed() -> None:
    first, second = Workload(7, 9, TODAY), Workload(7, 9, TODAY)
    assert [o.org_id for o in first.orgs] == [o.org_id for o in second.orgs]
    assert [first.push_body() for _ in range(50)] == [second.push_body() for _ in range(50)]
    # Event ids, types and times are the seed's (line and item ids inside come from a shared counter).
    assert [(e["id"], e["type"], e["created"]) for e in first.deliveries()] == [
        (e["id"], e["type"], e["created"]) for e in second.deliveries()
    ]
    assert first.expected_usage() == second.expected_usage()
    assert Workload(8, 9, TODAY).orgs[0].org_id != first.orgs[0].org_id


def test_the_rows_cross_a_day_and_a_month_boundary() -> None:
    workload = Workload(1, 6, date(2026, 12, 9))
    assert workload.days == [date(2026, 11, 30), date(2026, 12, 8), date(2026, 12, 9)]
    assert Workload(1, 6, date(2026, 12, 1)).days == [date(2026, 11, 30), date(2026, 12, 1)]
    assert {o.plan for o in workload.usage_orgs} == {"free", "pro", "team"}


def test_in_order_delivery_is_what_any_order_gives_for_generated_stories() -> None:
    """The oracle's premise: for the stories the generator writes, order and duplicates do not matter."""
    rng = random.Random(16)
    checked = 0
    for seed in range(20):
        workload = Workload(seed, 9, TODAY)
        for org in (o for o in workload.orgs if o.role == "webhooks"):
            want = workload.expected_payment(org)
            for _ in range(40):
                order = [e for e in org.events for _ in range(rng.choice((1, 2)))]
                rng.shuffle(order)
                state = PaymentState(stripe_customer_id=org.customer)
                for raw in order:
                    event = parse_event(raw)
                    assert event is not None
                    state = apply_event(state, event).state
                got = (state.plan, state.payment_status, state.pending_plan)
                assert got == (want.plan, want.payment_status, want.pending_plan), (seed, org.org_id)
                checked += 1
    assert checked == 20 * 3 * 40


def test_a_violation_exits_non_zero_with_the_seed_and_the_first_org() -> None:
    workload = Workload(5, 6, TODAY)
    out = io.StringIO()
    verdicts = [
        Verdict("usage", violations=[]),
        Verdict("overage", violations=[("org-a", "task.created: queued 3, expected 2"), ("org-b", "x")]),
    ]
    status = _summary(5, 1.0, 60.0, Stats(), verdicts, workload, out)
    assert status == 1
    assert "VIOLATIONS: 2; replay with --seed 5; first differing org: org-a" in out.getvalue()
    assert _summary(5, 1.0, 60.0, Stats(), [Verdict("usage")], workload, io.StringIO()) == 0
