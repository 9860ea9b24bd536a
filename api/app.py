"""The HTTP API: routes and their shared dependencies (pool, Temporal client, settings)."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from temporalio.client import Client

from api import admin, health, meter_errors, usage, webhooks
from api.error_responses import EXCEPTION_HANDLERS
from api.quota import QuotaFastPath
from api.quota_cache import QuotaFlagCache
from api.schemas import openapi_document
from api.telemetry_middleware import TelemetryMiddleware
from billing.adapters.stripe_client import API_STRIPE_TIMEOUT_SECONDS, make_stripe_client
from billing.core.config import Settings


async def openapi_json(_: Request) -> JSONResponse:
    """The OpenAPI 3.1 document of this API (see api/schemas.py)."""
    return JSONResponse(openapi_document())


def create_app(settings: Settings, pool: AsyncConnectionPool, client: Client) -> Starlette:
    """The ASGI application; the caller owns the pool and the client."""
    routes = [
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/metrics", health.metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/v1/orgs/{org_id}", admin.put_org, methods=["PUT"]),
        Route("/v1/orgs/{org_id}", admin.get_org, methods=["GET"]),
        Route("/v1/orgs/{org_id}/projects/{project_id}", admin.put_project, methods=["PUT"]),
        Route("/v1/plans/{plan}", admin.put_plan, methods=["PUT"]),
        Route("/v1/plans/{plan}", admin.get_plan, methods=["GET"]),
        Route("/v1/metrics", usage.post_metrics, methods=["POST"]),
        Route("/v1/projects/{project_id}/quota", usage.get_quota, methods=["GET"]),
        Route("/v1/stripe/webhook", webhooks.stripe_webhook, methods=["POST"]),
        Route("/v1/stripe/meter-errors", meter_errors.stripe_meter_errors, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        # The quota fast path first: the gateway's well-formed checks skip the framework (api/quota.py).
        middleware=[Middleware(QuotaFastPath), Middleware(TelemetryMiddleware)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.settings = settings
    app.state.pool = pool
    app.state.client = client
    # The API's one Stripe client (None without STRIPE_API_KEY): webhook lookups, meter error details.
    app.state.stripe = make_stripe_client(settings, timeout=API_STRIPE_TIMEOUT_SECONDS)
    app.state.api_token = settings.require_api_token()
    # Quota flags in memory (api/quota_cache.py); it answers once its owner runs it (billing api does),
    # until then every check reads the database.
    app.state.flag_cache = QuotaFlagCache(settings.database_url) if settings.database_url else None
    return app
