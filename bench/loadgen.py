"""A small HTTP/1.1 load generator, run in a process of its own so that it is not the server's bottleneck.

    python -m bench.loadgen --port 8080 --path '/v1/...' --requests 20000 --concurrency 32 [--header K:V]
    python -m bench.loadgen --port 8080 --posts-file posts.jsonl --concurrency 32

Keep-alive connections over raw asyncio streams (uvloop when installed): each of ``concurrency``
connections sends a GET, reads the whole answer (Content-Length framed, as uvicorn sends it), and sends
the next, until ``requests`` answers came back. ``--paths-file`` gives one path per line, used in turn.
``--posts-file`` gives one POST per line instead, as JSON ``{"path", "headers": {...}, "body"}``; each is
sent once (``--requests`` defaults to their number). Prints one JSON line: when it started (epoch
seconds), seconds, requests per second, latency percentiles (ms) and status counts.
It does nothing but write prepared bytes and split answers, so one core drives several thousand
requests per second, well above what the servers it measures answer on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


async def _connection(
    host: str,
    port: int,
    requests: list[bytes],
    claim: list[int],
    total: int,
    latencies: list[float],
    statuses: Counter[int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while claim[0] < total:
            n = claim[0]
            claim[0] += 1
            started = time.perf_counter()
            writer.write(requests[n % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            statuses[status] += 1
    finally:
        writer.close()


def post_request(host: str, port: int, post: dict[str, object], headers: list[str]) -> bytes:
    """The bytes of one POST line of ``--posts-file``."""
    body = str(post["body"]).encode()
    extra = "".join(f"{h}\r\n" for h in headers)
    extra += "".join(f"{k}: {v}\r\n" for k, v in dict(post.get("headers") or {}).items())  # type: ignore[call-overload]
    head = (
        f"POST {post['path']} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def run(
    host: str,
    port: int,
    paths: list[str],
    headers: list[str],
    total: int,
    concurrency: int,
    prepared: list[bytes] | None = None,
) -> dict[str, object]:
    """Send ``total`` GETs (or the ``prepared`` requests) over ``concurrency`` connections; the measurements."""
    extra = "".join(f"{h}\r\n" for h in headers)
    requests = prepared or [
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode("latin-1") for path in paths
    ]
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    claim = [0]
    started_at = time.time()
    started = time.perf_counter()
    await asyncio.gather(
        *(_connection(host, port, requests, claim, total, latencies, statuses) for _ in range(concurrency))
    )
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "started_at": started_at,
        "requests": len(latencies),
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "max_ms": 1000 * latencies[-1],
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", action="append", default=[])
    parser.add_argument("--paths-file")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--posts-file")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    paths = list(args.path)
    if args.paths_file:
        with open(args.paths_file) as f:
            paths += [line.strip() for line in f if line.strip()]
    prepared = None
    if args.posts_file:
        with open(args.posts_file) as f:
            prepared = [
                post_request(args.host, args.port, json.loads(line), args.header)
                for line in f
                if line.strip()
            ]
    total = args.requests or (len(prepared) if prepared else 20_000)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run(args.host, args.port, paths, args.header, total, args.concurrency, prepared))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
