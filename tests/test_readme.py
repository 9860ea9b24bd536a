"""README.md is tested: its Quick start banner and its walk run as printed against a real ``billing dev``.

Blocks marked ``<!-- readme-test -->`` are run in order with bash in a fresh checkout-like directory
(``.data`` is the stack's data directory), and the fenced block right after each (``text`` or ``json``)
is the output it must print. Compared as printed, except: ISO times, the token and where PostgreSQL
lives are ignored; the README's ports are swapped for this stack's free ones, and its November-2026
dates for this month's (a row may not lie in the future). JSON is compared as data (curl prints it on
one line, the README indents it).

The same stack answers a few more questions a newcomer runs into (a closed pipe, a second ``billing
dev``, Stripe missing or unreachable).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from billing.core.clock import current_month
from billing.domain.months import previous_month
from billing.testing.scratch import fresh_database
from tests.conftest import VENV_BIN

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ORG = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
PROJECT = "6f1c2c1e-8d57-4a3e-9a51-0d7d1f0c2b11"
# The PATH of a newcomer's shell: no .venv/bin (sourcing .data/dev.env must add it).
BASE_PATH = os.pathsep.join(
    dict.fromkeys(str(Path(shutil.which(tool) or "/usr/bin/x").parent) for tool in ("bash", "curl", "head"))
)

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)")


@dataclass
class Example:
    """A shell block of the README and the output shown after it."""

    line: int
    command: str
    expected: str
    kind: str  # "text" or "json"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _next_month(month: str) -> str:
    year, number = map(int, month.split("-"))
    return f"{year + number // 12}-{number % 12 + 1:02d}"


def localise(text: str, ports: dict[int, int], today: datetime) -> str:
    """The README as it reads on this machine today: this stack's ports, this month's dates."""
    for theirs, ours in ports.items():
        text = text.replace(f"localhost:{theirs}", f"localhost:{ours}")
        text = text.replace(f"127.0.0.1:{theirs}", f"127.0.0.1:{ours}")
    month = current_month(today)
    dates = {
        "2026-11-28": today.strftime("%Y-%m-%d"),
        "2026-10": previous_month(month),
        "2026-11": month,
        "2026-12": _next_month(month),
    }
    # One pass, so that a date replaced is never replaced again.
    return re.sub("|".join(map(re.escape, dates)), lambda found: dates[found.group(0)], text)


def _fence(lines: list[str], start: int) -> tuple[str, str, int]:
    """The fenced block opening at ``start``: (info string, body, index after its closing fence)."""
    info = lines[start].strip().removeprefix("```").strip()
    end = start + 1
    while not lines[end].startswith("```"):
        end += 1
    return info, "\n".join(lines[start + 1 : end]), end + 1


def parse(text: str) -> tuple[str, list[Example]]:
    """The banner block and the tested examples of a README text."""
    lines = text.splitlines()
    banner = ""
    examples: list[Example] = []
    index = 0
    while index < len(lines):
        marker = lines[index].strip()
        if marker not in ("<!-- readme-test -->", "<!-- readme-test: banner -->"):
            index += 1
            continue
        info, body, index = _fence(lines, index + 1)
        if marker.endswith("banner -->"):
            banner = body
            continue
        assert info == "sh", f"README line {index}: a tested block must be ```sh"
        line = index
        while index < len(lines) and not lines[index].strip():
            index += 1
        expected, kind = "", "text"
        if index < len(lines) and lines[index].strip() in ("```text", "```json"):
            kind, expected, index = _fence(lines, index)
        examples.append(Example(line, body, expected, kind))
    return banner, examples


def normalise(text: str, token: str) -> str:
    """What may differ between two runs, replaced by placeholders."""
    text = TIME.sub("<time>", text.replace(token, "<token>"))
    text = re.sub(r"(API token:\s+)\S+", r"\1<token>", text)
    return re.sub(r"(PostgreSQL:\s+).*", r"\1<where>", text)


def _normalise_json(value: object, token: str) -> object:
    if isinstance(value, str):
        return normalise(value, token)
    if isinstance(value, list):
        return [_normalise_json(item, token) for item in value]
    if isinstance(value, dict):
        return {key: _normalise_json(item, token) for key, item in value.items()}
    return value


@dataclass
class Stack:
    """A running ``billing dev`` for the README, in ``workdir`` (its data in ``workdir/.data``)."""

    workdir: Path
    process: subprocess.Popen[str]
    banner: str
    token: str
    ports: dict[int, int]
    database_url: str
    today: datetime

    def shell(self, command: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``command`` with bash as a newcomer's shell would, in the checkout."""
        return subprocess.run(
            ["bash", "-c", command],
            cwd=self.workdir,
            env={"PATH": BASE_PATH, "HOME": os.environ.get("HOME", "/tmp"), **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def billing(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """The CLI with the dev stack's settings (what `source .data/dev.env` gives)."""
        # By path, not through PATH: these tests are about the command, the walk tests the PATH.
        quoted = " ".join(f"'{arg}'" for arg in args)
        return self.shell(f"source .data/dev.env && {VENV_BIN / 'billing'} {quoted}", **env)


@pytest.fixture(scope="module")
def stack(postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``billing dev`` on a fresh database of the session's PostgreSQL and its own Temporal dev server."""
    workdir = tmp_path_factory.mktemp("readme")
    # The worker's metrics port too: a busy default (another stack on this machine) adds a line to the banner.
    ports = {8080: _free_port(), 7233: _free_port(), 8233: _free_port(), 9464: _free_port()}
    with fresh_database(postgres_admin_url, migrated=False, prefix="billing_readme") as database_url:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "billing"),
                "dev",
                "--data-dir",
                ".data",
                "--temporal-port",
                str(ports[7233]),
                "--ui-port",
                str(ports[8233]),
            ],
            cwd=workdir,
            env={
                "PATH": BASE_PATH,
                "HOME": os.environ.get("HOME", "/tmp"),
                "DATABASE_URL": database_url,
                "BILLING_HTTP_ADDR": f"127.0.0.1:{ports[8080]}",
                "BILLING_WORKER_METRICS_ADDR": f"127.0.0.1:{ports[9464]}",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        banner = []
        for line in process.stdout:
            banner.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        try:
            token = (workdir / ".data" / "api_token").read_text().strip()
            yield Stack(workdir, process, "".join(banner), token, ports, database_url, datetime.now(UTC))
        finally:
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=60)


def _readme(stack: Stack) -> tuple[str, list[Example]]:
    return parse(localise(README.read_text(), stack.ports, stack.today))


def test_the_quick_start_banner_is_what_billing_dev_prints(stack: Stack) -> None:
    banner, _ = _readme(stack)
    assert banner, "README has no <!-- readme-test: banner --> block"
    assert normalise(stack.banner, stack.token).splitlines() == normalise(banner, stack.token).splitlines()


def test_the_readme_walk_runs_as_printed(stack: Stack) -> None:
    _, examples = _readme(stack)
    commands = " ".join(example.command for example in examples)
    for needed in ("/v1/orgs/", "/projects/", "/v1/plans/", "/v1/metrics", "/quota", "Authorization: Bearer"):
        assert needed in commands, f"the README walk lost its {needed} example"
    for needed in ("billing status", "billing reset", "billing block", "billing unblock"):
        assert needed in commands, f"the README walk lost its {needed} example"
    prefix = ""
    for example in examples:
        result = stack.shell("set -o pipefail\n" + prefix + example.command)
        where = f"README line {example.line}: {example.command.splitlines()[0]}"
        assert result.returncode == 0, f"{where}\nexit {result.returncode}\n{result.stderr}"
        assert result.stderr == "", f"{where}\n{result.stderr}"
        if example.kind == "json":
            actual = _normalise_json(json.loads(result.stdout), stack.token)
            shown = _normalise_json(json.loads(example.expected), stack.token)
            assert actual == shown, f"{where}\nprints {result.stdout}"
        else:
            actual_lines = [line.rstrip() for line in normalise(result.stdout, stack.token).splitlines()]
            shown_lines = [line.rstrip() for line in normalise(example.expected, stack.token).splitlines()]
            assert actual_lines == shown_lines, f"{where}\nprints:\n{result.stdout}"
        if "source .data/dev.env" in example.command:
            prefix = "source .data/dev.env\n"


def test_status_into_a_closed_pipe_ends_quietly(stack: Stack) -> None:
    # `billing status ORG | head -3`, with head gone before the CLI writes: deterministic EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            ["bash", "-c", f"source .data/dev.env && {VENV_BIN / 'billing'} status {ORG}"],
            cwd=stack.workdir,
            env={"PATH": BASE_PATH, "HOME": os.environ.get("HOME", "/tmp")},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 0


def test_a_second_billing_dev_on_the_same_data_says_it_is_already_running(stack: Stack) -> None:
    result = stack.shell(
        f"{VENV_BIN / 'billing'} dev --data-dir .data --temporal-port {stack.ports[7233]} "
        f"--ui-port {stack.ports[8233]}"
    )
    assert result.returncode == 2, result
    pid = stack.process.pid
    assert result.stderr.startswith(
        f"billing: error: `billing dev` is already running on {stack.workdir / '.data'} (pid {pid})"
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert stack.process.poll() is None, "the first billing dev must keep running"


def test_status_of_a_past_month_and_json(stack: Stack) -> None:
    month = current_month(stack.today)
    past = stack.billing("status", ORG, "--month", previous_month(month))
    assert past.returncode == 0, past.stderr
    assert (
        f"  usage {previous_month(month)}: (quota flags are current: not shown for a past month)"
        in past.stdout
    )
    assert "EXCESS" not in past.stdout
    assert "storage.usage                             0 GiB / 1 GiB\n" in past.stdout
    raw = json.loads(stack.billing("status", ORG, "--json").stdout)
    storage = next(meter for meter in raw["usage"] if meter["tag"] == "storage.usage")
    assert (storage["used"], storage["included"], storage["over_by"]) == (1610612736, 1073741824, 536870912)


def _paid_org_with_a_pending_report(stack: Stack) -> str:
    """A `pro` org with a Stripe customer and one overage report waiting (the stack has no Stripe key)."""
    org, project = "7d2b1c4e-1111-4a3e-9a51-0d7d1f0c2b11", "7d2b1c4e-2222-4a3e-9a51-0d7d1f0c2b11"
    base = f"http://127.0.0.1:{stack.ports[8080]}"
    auth = {"Authorization": f"Bearer {stack.token}"}
    with httpx.Client(base_url=base, headers=auth, timeout=60) as http:
        if http.get(f"/v1/orgs/{org}").status_code == 200:
            return org
        http.put(
            f"/v1/orgs/{org}", json={"plan": "pro", "stripe_customer_id": "cus_ReadmeTest1"}
        ).raise_for_status()
        http.put(f"/v1/orgs/{org}/projects/{project}", json={"name": "api"}).raise_for_status()
        included = http.get("/v1/plans/pro").json()["limits"]["task.created"]
        day = stack.today.strftime("%Y-%m-%d")
        pushed = http.post(
            "/v1/metrics",
            json={
                "metrics": [
                    {
                        "project_id": project,
                        "tag": "task.created",
                        "created_at": f"{day}T00:00:00Z",
                        "updated_at": f"{day}T00:05:00Z",
                        "increment": included + 7,
                    }
                ]
            },
        )
        assert pushed.status_code == 200, pushed.text
        assert pushed.json()["rejected"] == []
    return org


def test_report_pending_says_nothing_will_be_sent_when_the_workers_have_no_key(stack: Stack) -> None:
    org = _paid_org_with_a_pending_report(stack)
    status = stack.billing("status", org)
    assert "STRIPE_API_KEY is not set: 1 report waits in the outbox as pending, none lost" in status.stdout
    assert "    pending: 1 report, 7 units" in status.stdout
    # This shell has a key; the workers of `make dev` do not: only theirs matters.
    result = stack.billing("report-pending", "--org", org, STRIPE_API_KEY="sk_test_readme")
    assert result.returncode == 2, result
    assert result.stderr.startswith(
        "billing: error: nothing will be sent: the workers have no STRIPE_API_KEY, so 1 report stays pending"
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "started" not in result.stdout


def test_reconcile_with_stripe_unreachable_is_one_line(stack: Stack) -> None:
    org = _paid_org_with_a_pending_report(stack)
    closed = _free_port()
    result = stack.billing(
        "reconcile",
        org,
        "--month",
        current_month(stack.today),
        STRIPE_API_KEY="sk_test_readme",
        STRIPE_API_BASE=f"http://127.0.0.1:{closed}",
    )
    assert result.returncode == 2, result
    assert result.stderr == (
        f"billing: error: cannot reach Stripe at http://127.0.0.1:{closed}; check the network or STRIPE_API_BASE\n"
    )


def test_the_readme_links_nothing_outside_the_repository() -> None:
    text = README.read_text()
    assert "../" not in re.sub(r"```.*?```", "", text, flags=re.S), "a clone has nothing above its root"
    assert "SPEC.md" not in text


def test_localise_moves_the_readme_dates_to_this_month() -> None:
    today = datetime(2027, 1, 5, 12, tzinfo=UTC)
    text = localise("2026-10 2026-11 2026-12 2026-11-28 localhost:8080", {8080: 1234}, today)
    assert text == "2026-12 2027-01 2027-02 2027-01-05 localhost:1234"
    assert localise("x", {}, today - timedelta(days=5)) == "x"
