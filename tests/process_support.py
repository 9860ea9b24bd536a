"""The API and the worker as real subprocesses (``billing api``, ``billing worker``), their memory
read from /proc, and raw-socket requests that stream bodies of any size."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from billing.testing.scratch import VENV_BIN
from tests.conftest import API_TOKEN

READY_SECONDS = 60.0


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Process:
    """A running ``billing`` subprocess."""

    proc: subprocess.Popen[str]
    port: int | None = None
    output: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def memory_kb(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the process in kB: its resident memory now, and its peak so far."""
        values = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values["VmRSS"], values["VmHWM"]


def process_env(database_url: str, temporal_address: str, task_queue: str, **extra: str) -> dict[str, str]:
    """The environment of a ``billing`` subprocess: only the settings given."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "DATABASE_URL": database_url,
        "TEMPORAL_ADDRESS": temporal_address,
        "BILLING_TASK_QUEUE": task_queue,
        "BILLING_API_TOKEN": API_TOKEN,
        **extra,
    }


@contextlib.contextmanager
def billing_process(command: str, env: dict[str, str], ready: str) -> Iterator[Process]:
    """Start ``billing COMMAND`` and wait until it prints a line containing ``ready``; stop it after."""
    port = None
    if command == "api":
        port = free_port()
        env = {**env, "BILLING_HTTP_ADDR": f"127.0.0.1:{port}"}
    proc = subprocess.Popen(
        [str(VENV_BIN / "billing"), command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    process = Process(proc, port)
    selector = selectors.DefaultSelector()
    assert proc.stdout is not None
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_SECONDS
    try:
        while True:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"billing {command} did not start: {''.join(process.output)}")
            if selector.select(timeout=0.5):
                line = proc.stdout.readline()
                process.output.append(line)
                if ready in line:
                    break
        yield process
    finally:
        selector.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()


@dataclass
class RawAnswer:
    """What a raw-socket request got back: the status line's code (0 if none) and the bytes sent."""

    status: int
    body: bytes
    sent: int


def stream_request(
    port: int, method: str, path: str, headers: dict[str, str], total_bytes: int, chunk: bytes
) -> RawAnswer:
    """Send a chunked body of ``total_bytes`` (``chunk`` repeated) until done or the server stops
    taking it, while a reader thread collects the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    received = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                received.extend(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    sent = 0
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    try:
        sock.sendall(head.encode())
        while sent < total_bytes:
            sock.sendall(framed)
            sent += len(chunk)
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server answered and closed the connection: the rest is not read, as intended
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    reader.join(timeout=60)
    sock.close()
    status = 0
    if received.startswith(b"HTTP/1.1 "):
        status = int(received[9:12])
    return RawAnswer(status, bytes(received.partition(b"\r\n\r\n")[2]), sent)


class PeakSampler:
    """Samples a process's resident memory while a block runs; ``peak_kb`` is the highest seen."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self.process.memory_kb()[0])
            self._stop.wait(0.01)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.process.memory_kb()[0])
