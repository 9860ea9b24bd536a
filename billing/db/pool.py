"""PostgreSQL connections: one async pool per process, checked at start-up."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from billing.core.config import Settings
from billing.core.errors import ConfigError


def describe_url(url: str) -> str:
    """A URL with its password hidden, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable URL>"
    host = info.get("host", "localhost")
    return f"{info.get('user', '')}@{host}:{info.get('port', 5432)}/{info.get('dbname', '')}"


async def configure_session(conn: psycopg.AsyncConnection) -> None:
    """What every pooled session is set up with before its first use."""
    # A usage batch is applied through temp tables of about 10 MB per 100,000 rows; PostgreSQL's
    # default 8 MB of temp buffers spills them to disk. Only sessions that use temp tables grow to
    # this size. Set per session (not as a startup option, which poolers such as PgBouncer refuse).
    # In autocommit: no BEGIN and COMMIT around it, so a new session is never seen "idle in
    # transaction" (tests/test_stripe_sender.py looks for exactly that while a Stripe call is held).
    await conn.set_autocommit(True)
    await conn.execute("SET temp_buffers = '64MB'")
    await conn.set_autocommit(False)


async def open_pool(
    url: str,
    *,
    setting: str = "DATABASE_URL",
    max_size: int = 10,
    check: Callable[[psycopg.AsyncConnection], Awaitable[None]] | None = None,
) -> AsyncConnectionPool:
    """Open a pool and prove the server answers; ConfigError naming ``setting`` if it does not.

    ``check`` runs on every connection as it is handed out (a hook: the tests' clock uses it).
    """
    # One plain connection first: it fails fast with the server's own message, where the pool would
    # retry in the background and log every attempt.
    try:
        probe = await psycopg.AsyncConnection.connect(url, connect_timeout=10)
        await probe.close()
    except psycopg.Error as exc:
        raise unreachable(setting, url, exc) from None
    pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        open=False,
        kwargs={"row_factory": dict_row},
        configure=configure_session,
        check=check,
        timeout=10,
    )
    try:
        await pool.open(wait=True, timeout=10)
    except Exception as exc:
        await pool.close()
        raise ConfigError(setting, f"PostgreSQL at {describe_url(url)} does not answer ({exc})") from None
    return pool


@contextlib.asynccontextmanager
async def database_pool(settings: Settings, *, max_size: int = 2) -> AsyncIterator[AsyncConnectionPool]:
    """A command's pool on DATABASE_URL (ConfigError if unset or unreachable), closed when it is done.

    The one way the CLI reaches PostgreSQL (billing.cli.services.open_services uses it too).
    """
    pool = await open_pool(settings.require_database_url(), max_size=max_size)
    try:
        yield pool
    finally:
        await pool.close()


def check_connect(url: str, *, setting: str = "DATABASE_URL") -> psycopg.Connection:
    """A synchronous connection, or ConfigError naming ``setting``."""
    try:
        return psycopg.connect(url, connect_timeout=10, row_factory=dict_row)
    except psycopg.Error as exc:
        raise unreachable(setting, url, exc) from None


# What libpq says when nothing listens there (as opposed to a server that answers and refuses).
_NOBODY_THERE = ("connection refused", "no such file or directory", "timeout expired", "could not translate")


def unreachable(setting: str, url: str, exc: Exception) -> ConfigError:
    """One line for a failed connection, pointing to the likely fix.

    Nobody listening at the dev stack's address usually means `make dev` is not running; a server
    that answers and refuses (authentication, unknown database) gets its own reason instead.
    """
    reason = _first_line(exc).rsplit(" failed: ", 1)[-1].strip()
    where = describe_url(url)
    if any(marker in reason.lower() for marker in _NOBODY_THERE):
        hint = " — is `make dev` running?" if setting == "DATABASE_URL" else ""
        return ConfigError(setting, f"cannot reach PostgreSQL at {where} ({reason}){hint}")
    return ConfigError(setting, f"PostgreSQL at {where} refused the connection ({reason})")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
