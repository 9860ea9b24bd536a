"""An in-process HTTP client for the API (httpx over ASGI, no socket)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from api.app import create_app
from billing.core.config import Settings
from tests.conftest import API_TOKEN

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@contextlib.asynccontextmanager
async def api_client(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to ``create_app(...)`` directly."""
    app = create_app(settings, pool, client)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
        yield http
