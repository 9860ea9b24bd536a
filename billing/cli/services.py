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

from billing.core.config import Settings
from billing.core.errors import ConfigError
from billing.db.pool import database_pool
from billing.orchestration.temporal import connect, ensure_schedules

# How long in-flight HTTP requests get to finish on shutdown before they are cancelled.
GRACEFUL_SHUTDOWN_SECONDS = 3


@dataclass
class Services:
    """A command's open connections."""

    settings: Settings
    pool: AsyncConnectionPool
    client: Client
    # Where the Temporal SDK serves its metrics (inside the process; the worker's /metrics adds them).
    sdk_metrics_url: str | None = None


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, *, pool_size: int = 10, worker_metrics: bool = False
) -> AsyncIterator[Services]:
    """Open the pool and the client (one-line ConfigError if either is unreachable); close on exit.

    ``worker_metrics``: connect through a Temporal runtime that publishes the SDK's metrics (on a
    free local port), for the worker's /metrics. Tracing is configured here for every long-running
    command (billing.observability.tracing).
    """
    from billing.observability.metrics import free_local_port, temporal_runtime
    from billing.observability.tracing import configure_tracing

    configure_tracing()
    runtime, sdk_url = None, None
    if worker_metrics:
        sdk_addr = f"127.0.0.1:{free_local_port()}"
        runtime, sdk_url = temporal_runtime(sdk_addr), f"http://{sdk_addr}/metrics"
    async with database_pool(settings, max_size=pool_size) as pool:
        client = await connect(settings, runtime=runtime)
        yield Services(settings, pool, client, sdk_url)


def _metrics_listen(settings: Settings) -> tuple[str, int] | None:
    """BILLING_WORKER_METRICS_ADDR if it can be listened on. A busy default is skipped with a note
    (a second worker on one host); a busy address that was set is a ConfigError."""
    host, _, port = settings.worker_metrics_addr.rpartition(":")
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            message = f"cannot listen on {settings.worker_metrics_addr} ({exc.strerror})"
            if settings.is_set("worker_metrics_addr"):
                raise ConfigError("BILLING_WORKER_METRICS_ADDR", message) from None
            print(f"worker metrics not served: {message}; set BILLING_WORKER_METRICS_ADDR", flush=True)
            return None
    return host, int(port)


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


def uvicorn_config(app: object, host: str, port: int) -> uvicorn.Config:
    """The API's uvicorn set-up (also the bare ceiling's in bench.quota, so both are measured alike).

    uvloop and httptools (pinned) roughly halve the server's own cost per request next to asyncio and
    h11; uvicorn picks them by name, so a missing one is a start-up error rather than a silent fallback.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        loop="uvloop",
        http="httptools",
        # Requests still running this long after Ctrl-C/SIGTERM are cancelled (a push waiting on its
        # workflow would otherwise hold the process): the whole stop stays under 10 s.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


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
    from billing.cli.wiring import build_worker
    from billing.observability.metrics import WorkerMetrics

    tasks: list[asyncio.Task[None]] = []
    worker = None
    server = None
    metrics_server = None
    flag_cache_task: asyncio.Task[None] | None = None
    if run_worker:
        await ensure_schedules(services.client, services.settings.task_queue)
        worker = build_worker(services.settings, services.pool, services.client)
        tasks.append(asyncio.create_task(worker.run()))
        listen = _metrics_listen(services.settings)
        if listen is not None:
            metrics_app = WorkerMetrics(services.pool, services.sdk_metrics_url).app()
            metrics_server = uvicorn.Server(
                uvicorn.Config(
                    metrics_app, host=listen[0], port=listen[1], log_level="warning", lifespan="off"
                )
            )
            metrics_server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            tasks.append(asyncio.create_task(metrics_server.serve()))
    if run_api:
        check_port_free(services.settings)
        host, port = services.settings.http_host_port
        app = create_app(services.settings, services.pool, services.client)
        if app.state.flag_cache is not None:
            # Not among `tasks`: it runs until cancelled below, reconnecting by itself.
            flag_cache_task = asyncio.create_task(app.state.flag_cache.run())
        server = uvicorn.Server(uvicorn_config(app, host, port))
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
    if metrics_server is not None:
        metrics_server.should_exit = True
    if worker is not None:
        await worker.shutdown()
    stopper.cancel()
    if flag_cache_task is not None:
        flag_cache_task.cancel()
        tasks.append(flag_cache_task)
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if task is not stopper and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
