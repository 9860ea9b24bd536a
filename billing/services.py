"""Opening and closing what a command needs: the PostgreSQL pool and the Temporal client."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import uvicorn
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.config import Settings
from billing.db import open_pool
from billing.errors import ConfigError
from billing.temporal import connect, ensure_schedules

# How long in-flight HTTP requests get to finish on shutdown before they are cancelled.
GRACEFUL_SHUTDOWN_SECONDS = 3


@dataclass
class Services:
    """A command's open connections."""

    settings: Settings
    pool: AsyncConnectionPool
    client: Client


@contextlib.asynccontextmanager
async def open_services(settings: Settings, *, pool_size: int = 10) -> AsyncIterator[Services]:
    """Open the pool and the client (one-line ConfigError if either is unreachable); close on exit."""
    pool = await open_pool(settings.require_database_url(), max_size=pool_size)
    try:
        client = await connect(settings)
        yield Services(settings, pool, client)
    finally:
        await pool.close()


def check_port_free(settings: Settings) -> None:
    """ConfigError naming BILLING_HTTP_ADDR when the API could not listen there."""
    host, port = settings.http_host_port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                "BILLING_HTTP_ADDR", f"cannot listen on {settings.http_addr} ({exc.strerror})"
            ) from None


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, for clean shutdown of long-running commands."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


async def serve_until_stopped(
    services: Services,
    *,
    run_worker: bool,
    run_api: bool,
    stop: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run the worker and/or the HTTP API until ``stop`` is set, then shut both down gracefully.

    ``on_ready`` is called once the API accepts connections (so a printed address works at once).
    """
    from api.app import create_app
    from worker import build_worker

    tasks: list[asyncio.Task[None]] = []
    worker = None
    server = None
    if run_worker:
        await ensure_schedules(services.client, services.settings.task_queue)
        worker = build_worker(services.settings, services.pool, services.client)
        tasks.append(asyncio.create_task(worker.run()))
    if run_api:
        check_port_free(services.settings)
        host, port = services.settings.http_host_port
        app = create_app(services.settings, services.pool, services.client)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                lifespan="off",
                # Requests still running this long after Ctrl-C/SIGTERM are cancelled (a push waiting
                # on its workflow would otherwise hold the process): the whole stop stays under 10 s.
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            )
        )
        # uvicorn installs its own signal handlers; ours decide when to stop.
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        tasks.append(asyncio.create_task(server.serve()))
    while server is not None and not server.started and not tasks[-1].done():
        await asyncio.sleep(0.05)
    if on_ready is not None:
        on_ready()
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    if server is not None:
        server.should_exit = True
    if worker is not None:
        await worker.shutdown()
    stopper.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if task is not stopper and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
