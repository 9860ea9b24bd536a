"""``pip install .`` (not editable) into a fresh virtualenv gives a working ``billing``: the SQL ships as
package data, nothing is read from the checkout.

The project alone is built and installed (``--no-deps``, no build isolation: the backend comes with the
test extras), so nothing is downloaded; its dependencies are those of the test environment, made
visible to the fresh virtualenv by a ``.pth`` line (they are not what this test is about). The
project is installed from a copy of the checkout that is deleted before ``billing`` runs, so a path
back into the source tree would fail here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import fresh_database

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(
    ".git", ".venv", ".data", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def _run(command: list[str | Path], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def test_pip_install_dot_gives_a_working_billing(tmp_path: Path, postgres_admin_url: str) -> None:
    source, venv, elsewhere = tmp_path / "source", tmp_path / "venv", tmp_path / "elsewhere"
    shutil.copytree(ROOT, source, ignore=_SKIP)
    elsewhere.mkdir()
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
        ).stdout.strip()
    )
    (site / "test-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")

    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-cache-dir", source],
        tmp_path,
    )  # fmt: skip
    shutil.rmtree(source)

    located = _run(
        [python, "-c", "import billing, billing.db.sql as s; print(billing.__file__); print(s.SQL_DIR)"],
        elsewhere,
    ).stdout.split()
    assert all(Path(path).is_relative_to(site) for path in located), located
    assert (Path(located[1]) / "schema.sql").is_file()
    # Every module of the shipped packages imports from the install (pyproject lists each package).
    walk = (
        "import importlib, pkgutil\n"
        "for top in ('billing', 'workflows', 'activities', 'api', 'bench', 'worker'):\n"
        "    module = importlib.import_module(top)\n"
        "    for info in pkgutil.walk_packages(getattr(module, '__path__', []), top + '.'):\n"
        "        importlib.import_module(info.name)\n"
    )
    _run([python, "-c", walk], elsewhere)

    billing = venv / "bin" / "billing"
    assert "migrate" in _run([billing, "--help"], elsewhere).stdout
    for command in ("migrate", "dev", "worker", "api"):
        _run([billing, command, "--help"], elsewhere)
    with fresh_database(postgres_admin_url, migrated=False, prefix="billing_install") as url:
        migrated = _run([billing, "migrate", "--sql-only"], elsewhere, DATABASE_URL=url).stdout
        assert "applied 0001_schema.sql" in migrated
        # A command that runs named queries from the package's sql/queries/<concern>/ folders.
        sizes = json.loads(_run([billing, "system", "--json"], elsewhere, DATABASE_URL=url).stdout)
        assert sizes["batches"] == 0
