"""Benchmark of the month close: ``python -m bench.month_close [--orgs 10000]``.

In one run, on one fresh database and its own Temporal dev server with an in-process worker:
(a) ``orgs`` organizations that had usage last month (seeded in SQL: last month opened, one meter of
    usage); the ``monthly-close`` workflow for this month is run, and timed from its start until every
    ``monthly-reset/{org}/{month}`` has completed (each closed its org's month in PostgreSQL and the
    workflow is closed in Temporal);
(b) the ceilings: as many raw no-op workflows (bench/noop_workflow.py, on a worker with the same
    options) started with the same concurrency as the close starts resets, timed until all completed;
    once with plain starts (the issue's ceiling), once started eagerly as the close starts its resets
    (the first workflow task comes back with the start: a stricter ceiling).
Prints resets per second, no-op workflows per second and both ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from datetime import UTC, datetime

import psycopg
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from bench.noop_workflow import NoopWorkflow
from billing.cli.wiring import SANDBOX_PASSED_THROUGH, build_worker
from billing.core.config import Settings
from billing.db.pool import open_pool
from billing.db.sql import query
from billing.domain.months import month_key, parse_month, previous_month
from billing.models import MonthlyCloseInput
from billing.orchestration.temporal import CONCURRENT_STARTS
from billing.testing.scratch import scratch_database, throwaway_temporal_server
from workflows.monthly_close import MonthlyCloseWorkflow


def seed(url: str, orgs: int, month: str) -> None:
    """``orgs`` free orgs, each with last month opened and usage in it."""
    org_ids = [str(uuid.uuid4()) for _ in range(orgs)]
    last = parse_month(previous_month(month))
    with psycopg.connect(url) as conn:
        conn.execute(
            query("bench_seed_orgs"),
            {
                "org_ids": org_ids,
                "plan": "free",
                "project_orgs": org_ids,
                "project_ids": [str(uuid.uuid4()) for _ in org_ids],
            },
        )
        conn.execute(
            "INSERT INTO monthly_resets (organization_id, month) SELECT unnest(%s::uuid[]), %s",
            (org_ids, last),
        )
        conn.execute(
            "INSERT INTO org_usage (organization_id, tag, month, value)"
            " SELECT unnest(%s::uuid[]), 'task.created', %s, 7",
            (org_ids, last),
        )


def _completed(workflow_type: str) -> str:
    return f"WorkflowType = '{workflow_type}' AND ExecutionStatus = 'Completed'"


async def wait_completed(client: Client, workflow_type: str, count: int) -> None:
    """Until Temporal's visibility lists ``count`` completed workflows of ``workflow_type``."""
    while (await client.count_workflows(_completed(workflow_type))).count < count:
        await asyncio.sleep(0.2)


async def noop_ceiling(client: Client, queue: str, count: int, *, eager: bool) -> float:
    """Seconds to start ``count`` no-op workflows (``CONCURRENT_STARTS`` at a time) and see them done.

    ``eager``: started as the close starts its resets, the first workflow task coming back with the
    start to this process's worker (one round trip less); otherwise plain starts.
    """
    gate = asyncio.Semaphore(CONCURRENT_STARTS)
    run = uuid.uuid4().hex[:8]

    async def start(n: int) -> None:
        async with gate:
            await client.start_workflow(
                NoopWorkflow.run, id=f"noop/{run}/{n}", task_queue=queue, request_eager_start=eager
            )

    before = (await client.count_workflows(_completed("NoopWorkflow"))).count  # an earlier ceiling's
    started = time.perf_counter()
    await asyncio.gather(*(start(n) for n in range(count)))
    await wait_completed(client, "NoopWorkflow", before + count)
    return time.perf_counter() - started


async def close_month(url: str, client: Client, queue: str, month: str, count: int) -> float:
    """Seconds from the ``monthly-close`` start until every org's reset completed."""
    started = time.perf_counter()
    await client.execute_workflow(
        MonthlyCloseWorkflow.run,
        MonthlyCloseInput(month=month),
        id=f"monthly-close/bench-{month}",
        task_queue=queue,
    )
    await wait_completed(client, "MonthlyResetWorkflow", count)
    elapsed = time.perf_counter() - started
    with psycopg.connect(url) as conn:
        claimed = conn.execute(
            "SELECT count(*) FROM monthly_resets WHERE month = %s", (parse_month(month),)
        ).fetchone()
    assert claimed is not None and claimed[0] == count, f"{claimed} resets claimed, expected {count}"
    return elapsed


async def main(argv: list[str] | None = None) -> int:
    """Run both and print the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.month_close", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=10_000)
    args = parser.parse_args(argv)
    month = month_key(datetime.now(UTC))

    async with contextlib.AsyncExitStack() as stack:
        url = stack.enter_context(scratch_database("bench_close"))
        env = await stack.enter_async_context(throwaway_temporal_server())
        pool = await open_pool(url, max_size=20)
        stack.push_async_callback(pool.close)
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        settings = Settings.load(
            DATABASE_URL=url,
            TEMPORAL_ADDRESS=env.client.service_client.config.target_host,
            BILLING_TASK_QUEUE=queue,
        )
        seed(url, args.orgs, month)
        noop_queue = f"{queue}-noop"
        # The same worker options as build_worker's, with only the no-op workflow.
        noop_worker = Worker(
            env.client,
            task_queue=noop_queue,
            workflows=[NoopWorkflow],
            max_concurrent_activities=50,
            workflow_runner=SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_modules(*SANDBOX_PASSED_THROUGH)
            ),
        )
        async with noop_worker:
            noop_s = await noop_ceiling(env.client, noop_queue, args.orgs, eager=False)
            eager_s = await noop_ceiling(env.client, noop_queue, args.orgs, eager=True)
        async with build_worker(settings, pool, env.client):
            close_s = await close_month(url, env.client, queue, month, args.orgs)

    close_rate = args.orgs / close_s
    print(f"month close benchmark: {args.orgs:,} orgs with usage in {previous_month(month)}")
    print(f"  {'monthly-close until every reset completed':<48} {close_rate:>8,.0f} resets/s  ({close_s:.1f} s)")
    for how, seconds in (("", noop_s), ("eager ", eager_s)):
        label = f"raw no-op workflows, {CONCURRENT_STARTS} {how}starts at a time"
        print(f"  {label:<48} {args.orgs / seconds:>8,.0f} workflows/s  ({seconds:.1f} s)")
    print(f"  {'ratio to plain starts (the target is 0.8)':<48} {noop_s / close_s:>8.2f}")
    print(f"  {'ratio to eager starts (as the close starts)':<48} {eager_s / close_s:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
