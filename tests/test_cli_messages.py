"""Messages that point to the fix, human units and grammar, and a quiet first install."""

from __future__ import annotations

import os
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from billing.read.humanize import gib, iso, plural, verb
from tests.conftest import VENV_BIN

ROOT = Path(__file__).resolve().parent.parent
ORG = "3fa85f64-5717-4562-b3fc-2c963f66afa6"


def billing(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with only the given settings in its environment."""
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        [str(VENV_BIN / "billing"), *args], env=clean, capture_output=True, text=True, timeout=60, check=False
    )


def test_a_missing_database_url_suggests_the_dev_env() -> None:
    result = billing(["status", ORG])
    assert result.returncode == 2
    assert result.stderr == (
        "billing: error: DATABASE_URL: not set; `source .data/dev.env` to use the `make dev` stack "
        "(start it with `make dev`), or export DATABASE_URL=postgresql://...\n"
    )


def test_a_stopped_temporal_is_one_line_asking_whether_make_dev_runs() -> None:
    result = billing(["reset", ORG, "--month", "2026-11"], TEMPORAL_ADDRESS="127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr == (
        "billing: error: TEMPORAL_ADDRESS: cannot reach Temporal at 127.0.0.1:1 — is `make dev` running?\n"
    )


def test_a_stopped_postgresql_is_one_line_asking_whether_make_dev_runs() -> None:
    result = billing(["status", ORG], DATABASE_URL="postgresql://postgres@127.0.0.1:1/billing")
    assert result.returncode == 2
    assert result.stderr == (
        "billing: error: DATABASE_URL: cannot reach PostgreSQL at postgres@127.0.0.1:1/billing "
        "(Connection refused) — is `make dev` running?\n"
    )


def test_human_units_and_grammar() -> None:
    assert [plural(n, "report") for n in (0, 1, 2, 1500)] == [
        "0 reports",
        "1 report",
        "2 reports",
        "1,500 reports",
    ]
    assert f"{plural(1, 'report')} {verb(1, 'waits', 'wait')}" == "1 report waits"
    assert f"reports for {plural(1, 'org')}" == "reports for 1 org"
    assert plural(1, "quota flag") == "1 quota flag"
    assert [gib(n) for n in (0, 1073741824, 1610612736, 1, 53687091200)] == [
        "0 GiB",
        "1 GiB",
        "1.5 GiB",
        "<0.01 GiB",
        "50 GiB",
    ]
    assert iso(1796078668) == "2026-11-30T22:44:28Z"
    assert iso(datetime(2026, 11, 30, 23, 15, tzinfo=UTC)) == "2026-11-30T23:15:00Z"


def _fake_venv(tmp_path: Path, pip_script: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, body in (("python", "exit 0"), ("pip", pip_script)):
        path = venv / "bin" / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "pyproject.toml").write_text("")
    return venv


BANNER = "echo 'BuildBackendWarning: Editable installation.' >&2; echo '!!' >&2"


def test_the_first_install_does_not_print_setuptools_banner(tmp_path: Path) -> None:
    _fake_venv(tmp_path, BANNER)
    result = subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "VENV=venv", "venv/.installed"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result
    assert "Editable installation" not in result.stdout + result.stderr
    assert result.stdout + result.stderr == "installing into venv (log: venv/install.log)\n"
    assert (tmp_path / "venv" / ".installed").exists()


def test_a_failing_install_still_shows_its_errors(tmp_path: Path) -> None:
    _fake_venv(tmp_path, "echo 'ERROR: No matching distribution found for stripe==99' >&2; exit 1")
    result = subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "VENV=venv", "venv/.installed"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "ERROR: No matching distribution found for stripe==99" in result.stderr
    assert not (tmp_path / "venv" / ".installed").exists()


@pytest.mark.parametrize("command", [["status", ORG], ["reset", ORG, "--month", "2026-11"]])
def test_errors_are_one_line_even_for_many_line_causes(command: list[str]) -> None:
    result = billing(
        command, DATABASE_URL="postgresql://postgres@127.0.0.1:1/x", TEMPORAL_ADDRESS="127.0.0.1:1"
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "tonic" not in result.stderr and "Traceback" not in result.stderr
