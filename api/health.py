"""Liveness of the dependencies, and Prometheus metrics."""

from __future__ import annotations

import asyncio

import psycopg
import psycopg_pool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from billing.observability.outbox_gauges import refresh_outbox_gauges

_CHECK_TIMEOUT = 3.0


async def _postgres_ok(request: Request) -> str:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT), request.app.state.pool.connection() as conn:
            await conn.execute("SELECT 1")
        return "ok"
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"


async def _temporal_ok(request: Request) -> str:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT):
            await request.app.state.client.service_client.check_health()
        return "ok"
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"


async def healthz(request: Request) -> JSONResponse:
    """200 when PostgreSQL and Temporal answer; 503 naming the one that does not."""
    postgres, temporal = await asyncio.gather(_postgres_ok(request), _temporal_ok(request))
    healthy = postgres == "ok" and temporal == "ok"
    return JSONResponse(
        {"ok": healthy, "postgres": postgres, "temporal": temporal}, status_code=200 if healthy else 503
    )


async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this process's metrics."""
    try:
        # The Stripe outbox by state (rows waiting for a customer, uncertain, ...) as PostgreSQL has it
        # now; /metrics still answers, with the last values, when PostgreSQL does not.
        await asyncio.wait_for(refresh_outbox_gauges(request.app.state.pool), timeout=2)
    except (psycopg.Error, psycopg_pool.PoolTimeout, TimeoutError, AttributeError):
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
