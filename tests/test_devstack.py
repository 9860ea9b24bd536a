"""``billing dev`` as a user runs it: up, healthy, its schedules, Ctrl-C leaves nothing running."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
from temporalio.client import Client

from tests.conftest import VENV_BIN


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_dev(
    data_dir: Path, temporal_port: int, ui_port: int, api_port: int
) -> tuple[subprocess.Popen[str], str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "BILLING_HTTP_ADDR": f"127.0.0.1:{api_port}",
    }
    command = [
        str(VENV_BIN / "billing"),
        "dev",
        "--data-dir",
        str(data_dir),
        "--temporal-port",
        str(temporal_port),
        "--ui-port",
        str(ui_port),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    assert process.stdout is not None
    for line in process.stdout:
        banner.append(line)
        if line.startswith("Ctrl-C stops everything"):
            break
    return process, "".join(banner)


def _descendants(root: int) -> dict[int, str]:
    """Every live process under ``root`` (pid -> command line), read from /proc: only this test's own
    process tree, never other dev servers on the machine."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        # The command name in parentheses may hold spaces; the fields after it are fixed.
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        commands[int(entry.name)] = command
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = commands[pid]
                frontier.append(pid)
    return found


def _temporal_children(parent: int) -> list[int]:
    """The Temporal dev servers that ``parent`` started (its descendants)."""
    return [pid for pid, command in _descendants(parent).items() if "temporal server start-dev" in command]


async def test_billing_dev_runs_everything_and_ctrl_c_stops_it_all(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    temporal_port, ui_port, api_port = _free_port(), _free_port(), _free_port()

    process, banner = _start_dev(data_dir, temporal_port, ui_port, api_port)
    try:
        assert f"Temporal UI:  http://127.0.0.1:{ui_port}" in banner, banner
        assert f"API:          http://127.0.0.1:{api_port}" in banner
        token = (data_dir / "api_token").read_text().strip()
        assert f"API token:    {token}" in banner
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{api_port}/healthz")
            ui = await http.get(f"http://127.0.0.1:{ui_port}/")
        assert health.status_code == 200
        assert ui.status_code == 200
        client = await Client.connect(f"127.0.0.1:{temporal_port}")
        schedules = sorted([entry.id async for entry in await client.list_schedules()])
        assert schedules == [
            "monthly-close",
            "notifications-dispatch",
            "retention-daily",
            "storage-overage-hourly",
            "usage-sync-hourly",
        ]
        postgres_pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        started_here = set(_temporal_children(process.pid))
        assert len(started_here) == 1
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0, rest
    assert "billing dev stopped" in rest
    deadline = time.monotonic() + 10
    while (_alive(postgres_pid) or any(map(_alive, started_here))) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not _alive(postgres_pid), "embedded PostgreSQL left running"
    assert not any(map(_alive, started_here)), "Temporal dev server left running"

    again, banner = _start_dev(data_dir, temporal_port, ui_port, api_port)
    try:
        assert "(0 migrations applied now)" in banner, banner
        assert (data_dir / "api_token").read_text().strip() in banner
    finally:
        again.send_signal(signal.SIGINT)
        again.communicate(timeout=60)
    assert again.returncode == 0
