"""Benchmark of the gateway's quota check against a bare endpoint, and how fast a flag is enforced.

    python -m bench.quota [--requests 20000] [--concurrency 32] [--rounds 2]

In one run, on one fresh database and its own Temporal dev server, it starts two real API processes
(``billing api``, as deployed) and a bare Starlette endpoint returning the same JSON under the same
uvicorn set-up (bench/bare.py), and drives each with ``bench.loadgen`` in a process of its own:
``GET /v1/projects/{id}/quota?path=/api/v1/session/{id}/messages&method=POST`` over 1,000 projects,
``concurrency`` keep-alive connections, ``requests`` answers. The rounds alternate bare and API so
that the machine's noise hits both alike; the ratio is the API's rate over the bare one's, per round.

The API processes answer from their flag cache (api/quota_cache.py) once it is fresh; the bench prints
how many checks were answered from memory and how many from a database read.

Enforcement: a flag committed (and then removed) straight in ``quota_flags``; the time from the
commit until each API process answers 403 (then 200) is measured, per process, over several trials.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

from billing.db.sql import query
from billing.testing.scratch import scratch_database, throwaway_temporal_server

TOKEN = "bench-quota-token"
MESSAGES = "/api/v1/session/{}/messages"


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def quota_path(project_id: str) -> str:
    """The quota check the product's gateway asks before posting a session message."""
    return f"/v1/projects/{project_id}/quota?path={MESSAGES.format(project_id)}&method=POST"


def start(command: list[str], environ: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A server process, its output discarded."""
    return subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL)


async def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    """Until the server answers on ``port`` (or fail if it exited, or after a minute)."""
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server on port {port} exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                await client.get(f"http://127.0.0.1:{port}/v1/projects/{uuid.uuid4()}/quota")
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not start")


def load(port: int, paths_file: str, requests: int, concurrency: int) -> dict[str, object]:
    """Run bench.loadgen in a process of its own; its measurements."""
    out = subprocess.run(
        [
            sys.executable, "-m", "bench.loadgen", "--port", str(port), "--paths-file", paths_file,
            "--requests", str(requests), "--concurrency", str(concurrency),
            "--header", f"Authorization: Bearer {TOKEN}",
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def answer_sources(port: int) -> dict[str, int]:
    """How the API process answered quota checks so far: from memory or from a database read."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    sources = {}
    for line in text.splitlines():
        if line.startswith("billing_quota_checks_total{"):
            name, value = line.rsplit(" ", 1)
            sources[name.split('"')[1]] = int(float(value))
    return sources


async def enforcement_lag(
    url: str, ports: list[int], project_id: str, org_id: str, trials: int
) -> list[float]:
    """Seconds from a flag's commit (or its removal's) until each API process answers accordingly."""
    lags: list[float] = []
    path = quota_path(project_id)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
        httpx.AsyncClient(headers=headers) as client,
    ):
        for trial in range(trials):
            flag = trial % 2 == 0
            if flag:
                await conn.execute(
                    "INSERT INTO quota_flags (project_id, tag, organization_id, reason, month)"
                    " VALUES (%s, 'task.created', %s, 'over_limit', date_trunc('month', now())::date)",
                    (project_id, org_id),
                )
            else:
                await conn.execute("DELETE FROM quota_flags WHERE project_id = %s", (project_id,))
            committed = time.perf_counter()
            want = 403 if flag else 200
            for port in ports:
                while (await client.get(f"http://127.0.0.1:{port}{path}")).status_code != want:
                    await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - committed)
    return lags


async def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(prog="python -m bench.quota", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--projects", type=int, default=1_000)
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(scratch_database("bench_quota"))
        async with throwaway_temporal_server() as temporal:
            org_ids = [str(uuid.uuid4()) for _ in range(args.projects // 10)]
            project_orgs = [org for org in org_ids for _ in range(10)]
            project_ids = [str(uuid.uuid4()) for _ in project_orgs]
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    query("bench_seed_orgs"),
                    {
                        "org_ids": org_ids,
                        "plan": "free",
                        "project_orgs": project_orgs,
                        "project_ids": project_ids,
                    },
                )
            paths = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-quota-"))) / "paths"
            paths.write_text("".join(quota_path(p) + "\n" for p in project_ids))

            api_ports = [free_port(), free_port()]
            bare_port = free_port()
            processes: list[subprocess.Popen[bytes]] = []
            try:
                for port in api_ports:
                    environ = {
                        **os.environ,
                        "DATABASE_URL": url,
                        "TEMPORAL_ADDRESS": temporal.client.service_client.config.target_host,
                        "BILLING_API_TOKEN": TOKEN,
                        "BILLING_HTTP_ADDR": f"127.0.0.1:{port}",
                    }
                    processes.append(start([str(Path(sys.executable).parent / "billing"), "api"], environ))
                processes.append(start([sys.executable, "-m", "bench.bare", "--port", str(bare_port)]))
                for port, process in zip([*api_ports, bare_port], processes, strict=True):
                    await wait_ready(port, process)

                # Warm both (connections, prepared statements), then alternate.
                for port in (bare_port, api_ports[0]):
                    load(port, str(paths), 2_000, args.concurrency)
                rounds = []
                for _ in range(args.rounds):
                    bare = load(bare_port, str(paths), args.requests, args.concurrency)
                    api = load(api_ports[0], str(paths), args.requests, args.concurrency)
                    rounds.append((bare, api))
                sources = answer_sources(api_ports[0])
                lags = await enforcement_lag(url, api_ports, project_ids[0], org_ids[0], trials=20)
            finally:
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.wait(timeout=30)

    print(
        f"quota check benchmark: {args.requests:,} requests per side, {args.concurrency} concurrent,"
        f" GET quota for POST {MESSAGES.format('{id}')} over {args.projects:,} projects"
    )
    for n, (bare, api) in enumerate(rounds, 1):
        for name, result in (("bare Starlette (ceiling)", bare), ("billing api", api)):
            print(
                f"  round {n}, {name:<25} {result['rps']:>8,.0f} req/s  p50 {result['p50_ms']:6.1f} ms"
                f"  p99 {result['p99_ms']:6.1f} ms  statuses {result['statuses']}"
            )
        print(f"  round {n}, ratio api / bare {api['rps'] / bare['rps']:>21.2f}")  # type: ignore[operator]
    print(f"  billing api answers by source (warm-up and rounds): {sources}")
    print(
        f"  flag enforced by both API processes after commit: max {1000 * max(lags):.1f} ms,"
        f" median {1000 * sorted(lags)[len(lags) // 2]:.1f} ms over {len(lags)} (process, change) pairs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
