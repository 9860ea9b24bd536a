"""Benchmark: signed Stripe webhook deliveries, as deployed, against the signal-with-start ceiling.

    python -m bench.webhooks [--deliveries 2000] [--orgs 50] [--concurrency 32] [--worker-late]

The deployment shape README tells operators to run: on one fresh database (billing/testing/scratch.py) and its
own Temporal dev server, ``billing api`` (uvicorn, uvloop + httptools) and ``billing worker`` each run as
a process of their own, and ``bench.loadgen``, in a third process, POSTs the signed deliveries over real
HTTP on ``concurrency`` keep-alive connections. Two invoice events per invoice, ``deliveries / orgs``
per org; every one must be answered 200.

Figures: **accepted**, deliveries per second until every POST got its 200 (Temporal durably has the
signal); **end to end**, until every event is ``applied`` in PostgreSQL by its org's workflow (billing
row, quota flags and the webhook log written), both from the load generator's first request; POST
latency p50/p99; and the **ceiling**: raw signal-with-start calls of the same events to the same org
workflows, straight to Temporal from this process at the same concurrency, in the same run (after the
deliveries, so the workflows drop them as duplicates). Ratios are printed against the ceiling, and
where the CPU went in each phase (each process, PostgreSQL's backends of this database, and the rest
of the machine). ``--worker-late`` starts the worker only once every POST was answered: the accept
path measured without the worker's load on Temporal (end to end then includes the worker's start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
from temporalio.client import Client

from bench.quota import free_port, start
from billing.db.sql import query
from billing.domain.ids import org_billing_id
from billing.domain.stripe_events import BillingEvent, parse_event
from billing.orchestration.temporal import signal_org_billing
from billing.testing.scratch import scratch_database, throwaway_temporal_server

SECRET = "whsec_bench_0123456789"
TOKEN = "bench-webhooks-token-0123456789"
T0 = 1_780_000_000


def _sign(body: bytes) -> str:
    t = int(time.time())
    mac = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def _event(org_id: str, i: int) -> dict:
    """A failed or paid metered invoice (old shape): each is applied with one database transaction."""
    invoice_id = f"in_{org_id[:8]}_{i // 2}"
    kind = "invoice.payment_failed" if i % 2 == 0 else "invoice.paid"
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": kind,
        "created": T0 + i,
        "data": {
            "object": {
                "id": invoice_id,
                "object": "invoice",
                "customer": f"cus_{org_id[:8]}",
                "subscription": f"sub_{org_id[:8]}",
                "subscription_details": {"metadata": {"organization_id": org_id}},
                "billing_reason": "subscription_threshold",
                "attempt_count": 1,
                "lines": {"object": "list", "data": [], "has_more": False},
                "status": "open" if kind == "invoice.payment_failed" else "paid",
            }
        },
    }


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _machine() -> tuple[float, float]:
    """Busy and idle CPU seconds of the whole machine so far (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / _TICKS, idle / _TICKS


class CpuMeter:
    """Where the CPU goes during a phase: each named process, PostgreSQL's backends serving the
    benchmark's database, and the rest of the machine (other work sharing it)."""

    def __init__(self, url: str, pids: dict[str, int]) -> None:
        self._url, self._pids = url, pids
        self.pids = pids
        self._start: dict[str, float] = {}
        self._backends: dict[int, float] = {}

    def _backend_pids(self) -> list[int]:
        with psycopg.connect(self._url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        return [row[0] for row in rows]

    def start(self) -> None:
        """Take the starting readings."""
        self._start = {name: _cpu(pid) for name, pid in self._pids.items()}
        self._backends = {pid: _cpu(pid) for pid in self._backend_pids()}
        self._start["machine"], self._start["idle"] = _machine()
        self._started = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """CPU seconds used since ``start`` by each process, ``postgres``, ``rest`` and ``wall``."""
        used = {name: _cpu(pid) - self._start[name] for name, pid in self._pids.items()}
        used["postgres"] = sum(_cpu(pid) - self._backends.get(pid, 0.0) for pid in self._backend_pids())
        busy, idle = _machine()
        used["wall"] = time.perf_counter() - self._started
        used["machine busy"] = busy - self._start["machine"]
        used["machine idle"] = idle - self._start["idle"]
        used["rest"] = used["machine busy"] - sum(used[name] for name in [*self._pids, "postgres"])
        return used


def _cpu_line(used: dict[str, float]) -> str:
    parts = [f"{name} {seconds:.1f}" for name, seconds in used.items() if name not in ("wall",)]
    return f"{used['wall']:.1f} s wall, CPU s: " + ", ".join(parts)


def _per_delivery(used: dict[str, float], n: int) -> str:
    """The bench's own processes' CPU per delivery, in ms (the rest of the machine left out)."""
    names = [name for name in used if name not in ("wall", "machine busy", "machine idle", "rest")]
    total = sum(used[name] for name in names)
    return (
        ", ".join(f"{name} {used[name] * 1000 / n:.2f}" for name in names) + f"; total {total * 1000 / n:.2f}"
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _wait_http(port: int, process: subprocess.Popen[bytes]) -> None:
    """Until ``billing api`` answers /healthz (or fail if it exited, or after a minute)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"billing api on port {port} exited with {process.returncode}")
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            await reader.read()
            writer.close()
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"billing api on port {port} did not start")


async def _applied(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute("SELECT count(*) FROM stripe_webhook_events WHERE status = 'applied'")
        ).fetchone()
    return int(row[0]) if row else 0


async def _wait_applied(url: str, n: int, limit: float) -> float:
    """The epoch time at which ``n`` events were seen applied (polled every 50 ms)."""
    deadline = time.monotonic() + limit
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = await (
                await conn.execute("SELECT count(*) FROM stripe_webhook_events WHERE status = 'applied'")
            ).fetchone()
            if row and row[0] >= n:
                return time.time()
            await asyncio.sleep(0.05)
    raise RuntimeError(f"not every event applied after {limit:.0f} s")


def _temporal_pid() -> int:
    """The Temporal dev server this process started (a child of it)."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            stat = (child / "stat").read_text()
            cmdline = (child / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == os.getpid() and b"start-dev" in cmdline:
            return int(child.name)
    return 0


async def _history_costs(client: Client, org_ids: list[str]) -> Counter[str]:
    """What the org workflows' histories hold (every run of each): workflow tasks, activities by type,
    search attribute upserts, continue-as-new and all history events, summed over the orgs."""
    costs: Counter[str] = Counter()
    for org_id in org_ids:
        async for execution in client.list_workflows(f"WorkflowId = '{org_billing_id(org_id)}'"):
            history = await client.get_workflow_handle(execution.id, run_id=execution.run_id).fetch_history()
            for event in history.events:
                costs["history events"] += 1
                kind = event.WhichOneof("attributes")
                if kind == "workflow_task_completed_event_attributes":
                    costs["workflow tasks"] += 1
                elif kind == "activity_task_scheduled_event_attributes":
                    costs[
                        f"activity {event.activity_task_scheduled_event_attributes.activity_type.name}"
                    ] += 1
                elif kind == "upsert_workflow_search_attributes_event_attributes":
                    costs["search attribute upserts"] += 1
                elif kind == "workflow_execution_continued_as_new_event_attributes":
                    costs["continue-as-new"] += 1
    return costs


async def _ceiling(
    client: Client, task_queue: str, events: list[BillingEvent], concurrency: int
) -> tuple[float, list[float]]:
    """Raw signal-with-start of ``events`` at ``concurrency``: seconds and per-call latencies."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def raw(event: BillingEvent) -> None:
        async with gate:
            started = time.perf_counter()
            assert event.organization_id is not None
            await signal_org_billing(client, task_queue, event.organization_id, event)
            latencies.append(time.perf_counter() - started)

    start = time.perf_counter()
    await asyncio.gather(*(raw(event) for event in events))
    return time.perf_counter() - start, latencies


async def run(deliveries: int, orgs: int, concurrency: int, *, worker_late: bool = False) -> int:
    """Run the benchmark and print the figures."""
    bin_dir = Path(sys.executable).parent
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(scratch_database("bench_webhooks"))
        async with throwaway_temporal_server() as temporal:
            target = temporal.client.service_client.config.target_host
            task_queue = f"bench-{uuid.uuid4().hex[:8]}"
            org_ids = [str(uuid.uuid4()) for _ in range(orgs)]
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    query("bench_seed_orgs"),
                    {
                        "org_ids": org_ids,
                        "plan": "pro",
                        "project_orgs": org_ids,
                        "project_ids": [str(uuid.uuid4()) for _ in org_ids],
                    },
                )
            per_org = deliveries // orgs
            bodies = [json.dumps(_event(org_id, i)).encode() for i in range(per_org) for org_id in org_ids]
            posts = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-webhooks-"))) / "posts"

            port = free_port()
            environ = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "BILLING_", "OTEL_"))},
                "DATABASE_URL": url,
                "TEMPORAL_ADDRESS": target,
                "BILLING_TASK_QUEUE": task_queue,
                "BILLING_API_TOKEN": TOKEN,
                "BILLING_HTTP_ADDR": f"127.0.0.1:{port}",
                "BILLING_WORKER_METRICS_ADDR": f"127.0.0.1:{free_port()}",
                "STRIPE_WEBHOOK_SECRET": SECRET,
            }
            worker_command = [str(bin_dir / "billing"), "worker"]
            api = start([str(bin_dir / "billing"), "api"], environ)
            processes = [api]
            try:
                if not worker_late:
                    processes.append(start(worker_command, environ))
                await _wait_http(port, api)
                if processes[-1].poll() is not None:
                    raise RuntimeError(f"billing worker exited with {processes[-1].returncode}")
                # Signed now: the load generator starts at once, well within the 300 s tolerance.
                posts.write_text(
                    "".join(
                        json.dumps(
                            {
                                "path": "/v1/stripe/webhook",
                                "headers": {"Stripe-Signature": _sign(body)},
                                "body": body.decode(),
                            }
                        )
                        + "\n"
                        for body in bodies
                    )
                )
                meter = CpuMeter(
                    url,
                    {
                        "billing api": api.pid,
                        **({} if worker_late else {"billing worker": processes[-1].pid}),
                        "temporal": _temporal_pid(),
                        "bench": os.getpid(),
                    },
                )
                meter.start()
                whole = CpuMeter(url, meter.pids)
                whole.start()
                loadgen = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.loadgen", "--port", str(port), "--posts-file", str(posts),
                    "--concurrency", str(concurrency),
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                if not worker_late:
                    applied_task = asyncio.create_task(_wait_applied(url, len(bodies), limit=600))
                out, _ = await loadgen.communicate()
                if loadgen.returncode:
                    raise RuntimeError(f"bench.loadgen exited with {loadgen.returncode}")
                posted = json.loads(out)
                accept_cpu = meter.stop()
                if worker_late:
                    processes.append(start(worker_command, environ))
                    applied_task = asyncio.create_task(_wait_applied(url, len(bodies), limit=600))
                applied_at = await applied_task
                whole_cpu = whole.stop()
                costs = await _history_costs(temporal.client, org_ids)
                statuses = posted["statuses"]
                if statuses != {"200": len(bodies)}:
                    raise RuntimeError(f"not every POST was answered 200: {statuses}")

                events = [parse_event(json.loads(body)) for body in bodies]
                meter.start()
                raw_seconds, raw_latencies = await _ceiling(
                    temporal.client, task_queue, [e for e in events if e is not None], concurrency
                )
                ceiling_cpu = meter.stop()
                applied_after = await _applied(url)
            finally:
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.wait(timeout=30)

    n = len(bodies)
    accepted = float(posted["seconds"])
    end_to_end = applied_at - float(posted["started_at"])
    e2e_rate, accept_rate, raw_rate = n / end_to_end, n / accepted, n / raw_seconds
    print(
        f"webhook benchmark: {n} signed deliveries over {orgs} orgs, {concurrency} concurrent, "
        "billing api and billing worker as processes of their own"
        + (" (the worker started only once every POST was answered)" if worker_late else "")
    )
    print(f"  accepted (every POST answered 200):        {accept_rate:8,.0f} deliveries/s ({accepted:.2f} s)")
    print(f"  end to end (every event applied in PG):    {e2e_rate:8,.0f} deliveries/s ({end_to_end:.2f} s)")
    print(
        f"  POST latency: p50 {posted['p50_ms']:.1f} ms, p99 {posted['p99_ms']:.1f} ms, max {posted['max_ms']:.1f} ms"
    )
    print(
        f"  ceiling, raw signal-with-start:            {raw_rate:8,.0f} calls/s ({raw_seconds:.2f} s; "
        f"p50 {statistics.median(raw_latencies) * 1000:.1f} ms, p99 {_pct(raw_latencies, 0.99) * 1000:.1f} ms)"
    )
    print(f"  ratio accepted / ceiling:   {accept_rate / raw_rate:.2f}   (target 0.8)")
    print(f"  ratio end to end / ceiling: {e2e_rate / raw_rate:.2f}   (target 0.5)")
    print(f"  POST p99 {posted['p99_ms']:.0f} ms                (target under 250 ms)")
    print(f"  where the CPU went while deliveries were accepted: {_cpu_line(accept_cpu)}")
    print(f"  where the CPU went until every event was applied: {_cpu_line(whole_cpu)}")
    print(f"  where the CPU went during the ceiling:            {_cpu_line(ceiling_cpu)}")
    print(f"  CPU ms per delivery, accepted and applied: {_per_delivery(whole_cpu, n)}")
    print(f"  CPU ms per raw signal, ceiling:            {_per_delivery(ceiling_cpu, n)}")
    print(
        "  org workflows' histories, per delivery: "
        + ", ".join(f"{name} {count / n:.2f}" for name, count in sorted(costs.items()))
    )
    if applied_after != n:
        print(f"  WARNING: {applied_after} events applied after the ceiling, expected {n}")
        return 1
    return 0


def main() -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--orgs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--worker-late",
        action="store_true",
        help="start the worker only once every POST was answered: the accept path without the worker's load",
    )
    args = parser.parse_args()
    return asyncio.run(run(args.deliveries, args.orgs, args.concurrency, worker_late=args.worker_late))


if __name__ == "__main__":
    sys.exit(main())
