"""``billing dev`` stops on Ctrl-C or SIGTERM at any moment of its start, and `make dev` never outlives make.

Nothing it started may outlive it: after the signal its process, the embedded PostgreSQL and the Temporal
dev server are gone and their ports are free again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from billing.cli import devstack
from billing.core.config import Settings
from tests.conftest import VENV_BIN

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _processes_using(data_dir: Path) -> list[tuple[psutil.Process, list[str]]]:
    """Live processes whose command line names ``data_dir`` (postgres -D, temporal --db-filename, billing dev).

    Each comes with the command line read at the same moment: a process may exit right after, and one
    that has exited but whose parent has not reaped it yet (a zombie, which holds nothing) is gone.
    """
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(str(data_dir) in part for part in cmdline):
            found.append((process, cmdline))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it only waits for its parent to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _postmaster_pid(data_dir: Path) -> int | None:
    pid_file = data_dir / "pg" / "postmaster.pid"
    try:
        return int(pid_file.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _wait_until_gone(data_dir: Path, ports: list[int], seconds: float = 30) -> list[str]:
    """What is still there after ``seconds`` (empty when everything is gone)."""
    deadline = time.monotonic() + seconds
    while True:
        left = [" ".join(cmdline[:3]) for _, cmdline in _processes_using(data_dir)]
        pid = _postmaster_pid(data_dir)
        if pid is not None and _alive(pid):
            left.append(f"postgres pid {pid}")
        left += [f"port {port} taken" for port in ports if not _port_free(port)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@contextlib.contextmanager
def _data_dir(prefix: str) -> Iterator[Path]:
    """A data directory outside pytest's own temp root.

    The embedded PostgreSQL runs as another user when we are root, so every parent directory must stay
    traversable; pytest tightens ``/tmp/pytest-of-<user>`` back to 0700 whenever any pytest starts
    (another session on the machine, say), which would pull the ground from under it.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path / "data"
    finally:
        _kill_leftovers(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_data() -> Iterator[Path]:
    """One data directory for every start below: the first start pays for initdb, the others reuse it."""
    with _data_dir("billing-devsignals-") as path:
        yield path


def _wait_until_its_code_runs(pid: int, seconds: float = 30) -> None:
    """Until ``billing`` runs its own first code (billing.cli.entry, which catches SIGTERM at once).

    Before that the interpreter is still starting (under load that takes a while): a signal then is
    Python's own fatal error for any program, so the start a signal may hit begins here.
    """
    sigterm = 1 << (signal.SIGTERM - 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("SigCgt:") and int(line.split()[1], 16) & sigterm:
                    return
        time.sleep(0.005)
    pytest.fail(f"billing dev did not reach its own code in {seconds} s")


def _kill_leftovers(data_dir: Path) -> None:
    for process, _ in _processes_using(data_dir):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@pytest.mark.parametrize(
    ("delay", "signum", "group"),
    [
        (0.2, signal.SIGINT, False),
        (0.5, signal.SIGTERM, False),
        (0.5, signal.SIGINT, True),
        (1.0, signal.SIGINT, False),
        (2.0, signal.SIGINT, True),
        (3.0, signal.SIGTERM, False),
        (8.0, signal.SIGINT, True),
    ],
    ids=[
        "0.2s-SIGINT",
        "0.5s-SIGTERM",
        "0.5s-ctrl-c",
        "1s-SIGINT",
        "2s-ctrl-c",
        "3s-SIGTERM",
        "8s-ctrl-c",
    ],
)
def test_a_signal_at_any_moment_of_the_start_stops_everything(
    pg_data: Path, delay: float, signum: signal.Signals, group: bool
) -> None:
    """``group``: sent to the whole process group, as a terminal's Ctrl-C is."""
    temporal_port, ui_port, api_port = _free_port(), _free_port(), _free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "BILLING_HTTP_ADDR": f"127.0.0.1:{api_port}",
    }
    command = [
        str(VENV_BIN / "billing"),
        "dev",
        "--data-dir",
        str(pg_data),
        "--temporal-port",
        str(temporal_port),
        "--ui-port",
        str(ui_port),
    ]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(
        target=lambda: lines.extend((time.monotonic(), line) for line in process.stdout or []),
        daemon=True,
    )
    reader.start()
    _wait_until_its_code_runs(process.pid)
    time.sleep(delay)
    signalled_at = time.monotonic()
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _kill_leftovers(pg_data)
        pytest.fail(f"billing dev still running 60 s after {signum.name} at {delay} s")
    reader.join(timeout=10)
    output = "".join(line for _, line in lines)
    assert "Traceback" not in output and "unexpected error" not in output, output
    # The signal is not swallowed: the stack does not come up after it.
    late = [line for at, line in lines if at > signalled_at and line.startswith("billing dev is running")]
    assert not late, f"the stack came up after {signum.name} at {delay} s:\n{output}"
    # 0 once it is running; 130 / 143 (the shell's convention) when the signal came while it was
    # still importing, before anything was started.
    assert process.returncode in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM), (process.returncode, output)
    left = _wait_until_gone(pg_data, [temporal_port, ui_port, api_port])
    if left:
        _kill_leftovers(pg_data)
    assert not left, f"left running after {signum.name} at {delay} s: {left}\n{output}"


def test_make_dev_does_not_leave_billing_dev_running_when_make_exits() -> None:
    with _data_dir("billing-makedev-") as data_dir:
        _make_dev_then_kill_make(data_dir)


def _make_dev_then_kill_make(data_dir: Path) -> None:
    temporal_port, ui_port, api_port = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "BILLING_HTTP_ADDR": f"127.0.0.1:{api_port}",
        "DEV_ARGS": f"--data-dir {data_dir} --temporal-port {temporal_port} --ui-port {ui_port}",
    }
    env.pop("DATABASE_URL", None)
    env.pop("TEMPORAL_ADDRESS", None)
    make = subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(ROOT), "dev"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert make.stdout is not None
    seen = []
    for line in make.stdout:
        seen.append(line)
        if line.startswith("Ctrl-C stops everything"):
            break
    billing = [process for process, cmdline in _processes_using(data_dir) if "dev" in cmdline[1:3]]
    assert billing, "".join(seen)
    # make goes away without passing anything on (SIGKILL: it cannot); billing dev must notice.
    make.kill()
    make.wait()
    left = _wait_until_gone(data_dir, [temporal_port, ui_port, api_port], seconds=60)
    if left:
        _kill_leftovers(data_dir)
    assert not left, f"left running after make exited: {left}"


def test_a_process_that_exited_but_is_not_reaped_counts_as_gone(tmp_path: Path) -> None:
    # CI once saw billing dev exit between being listed and having its command line read: a zombie
    # holds no port and no file, so the checks above must not count it (nor fail on reading it).
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(marker)])
    try:
        assert [process.pid for process, _ in _processes_using(marker)] == [child.pid]
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        assert _processes_using(marker) == []
        assert not _alive(child.pid)
        assert _wait_until_gone(marker, [], seconds=0) == []
    finally:
        child.kill()
        child.wait()


def test_secret_files_are_created_private_never_chmodded_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With umask 0 a file made by open() and chmodded afterwards is world-readable in between.
    old_umask = os.umask(0)
    try:

        def no_chmod_after(*args: object, **kwargs: object) -> None:
            raise AssertionError("chmod after creation: the file was readable by anyone in between")

        monkeypatch.setattr(Path, "chmod", no_chmod_after)
        monkeypatch.setattr(os, "chmod", no_chmod_after)
        token = devstack._api_token(Settings.load(BILLING_API_TOKEN=None), tmp_path)
        env_file = tmp_path / "dev.env"
        devstack.write_private(env_file, devstack.dev_env_text("postgresql://x", "h:1", token, "h:2"))
    finally:
        os.umask(old_umask)
    for name in ("api_token", "dev.env"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    text = env_file.read_text()
    assert text.splitlines()[0] == f"export PATH='{VENV_BIN}':\"$PATH\""
    assert f"export BILLING_API_TOKEN='{token}'" in text


def test_sourcing_dev_env_puts_billing_on_the_path(tmp_path: Path) -> None:
    env_file = tmp_path / "dev.env"
    devstack.write_private(env_file, devstack.dev_env_text("postgresql://x", "h:1", "t" * 20, "h:2"))
    result = subprocess.run(
        ["bash", "-c", f"source {env_file} && command -v billing"],
        env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(VENV_BIN / "billing")


_CHILD_DIES_OF_CTRL_C = """
import asyncio, contextlib, os, signal, subprocess, sys
from billing.cli import devstack
from billing.core.config import Settings

@contextlib.contextmanager
def postgres_whose_pg_ctl_dies_of_the_ctrl_c(data_dir):
    os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C reaches billing dev ...
    # ... and pg_ctl, in the same process group, which dies of it and fails the start
    raise subprocess.CalledProcessError(-signal.SIGINT, ["pg_ctl", "start"])
    yield ""

devstack.embedded_postgres = postgres_whose_pg_ctl_dies_of_the_ctrl_c
sys.exit(asyncio.run(devstack.run_dev(Settings.load(), data_dir=sys.argv[1])))
"""


def test_a_child_that_dies_of_the_terminals_ctrl_c_is_a_stop_not_an_error(tmp_path: Path) -> None:
    """The race behind a rare `0.5s-ctrl-c` failure, forced: the child's failure reaches `billing dev`
    together with its own SIGINT; it must stop quietly, never report an unexpected error."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run(
        [str(VENV_BIN / "python"), "-c", _CHILD_DIES_OF_CTRL_C, str(tmp_path / "data")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.splitlines() == [
        "billing dev stopped before it was ready; stopping what it started",
        "billing dev stopped",
    ]
