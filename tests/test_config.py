"""Each configuration error ends the command with one line naming the setting, exit status 2."""

from __future__ import annotations

import os
import subprocess

import pytest

from billing.core.config import Settings
from billing.core.errors import ConfigError
from tests.conftest import VENV_BIN

GOOD_DB = "postgresql://postgres@127.0.0.1:5432/postgres"
UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/postgres"
ORG = "3fa85f64-5717-4562-b3fc-2c963f66afa6"


def billing(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with only the given settings in its environment."""
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        [str(VENV_BIN / "billing"), *args], env=clean, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("args", "env", "setting", "says"),
    [
        (["migrate", "--sql-only"], {}, "DATABASE_URL", "not set"),
        (
            ["migrate", "--sql-only"],
            {"DATABASE_URL": "mysql://root@localhost/db"},
            "DATABASE_URL",
            "expected a postgresql:// URL",
        ),
        (
            ["migrate", "--sql-only"],
            {"DATABASE_URL": UNREACHABLE_DB},
            "DATABASE_URL",
            "cannot reach PostgreSQL at postgres@127.0.0.1:1/postgres (Connection refused) — is `make dev` running?",
        ),
        (
            ["status", ORG],
            {"DATABASE_URL": UNREACHABLE_DB},
            "DATABASE_URL",
            "cannot reach PostgreSQL at postgres@127.0.0.1:1/postgres (Connection refused) — is `make dev` running?",
        ),
        (
            ["reset", ORG, "--month", "2026-11"],
            {"TEMPORAL_ADDRESS": "no-port-here"},
            "TEMPORAL_ADDRESS",
            "expected HOST:PORT, got 'no-port-here'",
        ),
        (
            ["reset", ORG, "--month", "2026-11"],
            {"TEMPORAL_ADDRESS": "127.0.0.1:1"},
            "TEMPORAL_ADDRESS",
            "cannot reach Temporal at 127.0.0.1:1 — is `make dev` running?",
        ),
        (["api"], {"DATABASE_URL": GOOD_DB}, "BILLING_API_TOKEN", "not set"),
        (["api"], {"BILLING_API_TOKEN": "short"}, "BILLING_API_TOKEN", "at least 16 characters"),
        (["api"], {"BILLING_HTTP_ADDR": "8080"}, "BILLING_HTTP_ADDR", "expected HOST:PORT, got '8080'"),
        (["worker"], {"STRIPE_API_BASE": "stripe.local"}, "STRIPE_API_BASE", "expected an http:// or https:// URL"),
        (
            ["worker"],
            {"BILLING_METRICS_SOURCE_URL": "http://x"},
            "BILLING_METRICS_SOURCE_URL",
            "expected a postgresql:// URL",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_with_exit_status_2(
    args: list[str], env: dict[str, str], setting: str, says: str
) -> None:
    result = billing(args, **env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"billing: error: {setting}:"), lines[0]
    assert says in lines[0], lines[0]  # what is wrong with it, not only its name
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_arguments_are_one_line_with_exit_status_2() -> None:
    for args, says in (
        (["reset", "not-a-uuid", "--month", "2026-11"], "ORG_ID must be a UUID, got 'not-a-uuid'"),
        (["reset", ORG, "--month", "2026-13"], "expected a month as YYYY-MM, got '2026-13'"),
        (["nope"], "invalid choice: 'nope'"),
    ):
        result = billing(args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("billing: error: ") and says in lines[0], lines[0]


def test_settings_defaults_and_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "BILLING_TASK_QUEUE", "BILLING_HTTP_ADDR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.load()
    assert settings.temporal_address == "127.0.0.1:7233"
    assert settings.temporal_namespace == "default"
    assert settings.task_queue == "billing"
    assert settings.http_host_port == ("127.0.0.1", 8080)
    assert not settings.is_set("temporal_address")
    with pytest.raises(ConfigError, match=r"^TEMPORAL_ADDRESS: "):
        Settings.load(TEMPORAL_ADDRESS="host:notaport")


async def test_status_still_shows_what_postgresql_knows_when_temporal_is_down(
    database_url: str, pool: object
) -> None:
    from tests.factories import make_org

    org = await make_org(pool, plan="pro")  # type: ignore[arg-type]
    result = billing(["status", org.id], DATABASE_URL=database_url, TEMPORAL_ADDRESS="127.0.0.1:1")
    assert result.returncode == 0, result.stderr
    assert "plan: pro" in result.stdout
    assert "task.created" in result.stdout
    assert (
        "workflows and payment state machine: unknown, TEMPORAL_ADDRESS: cannot reach Temporal at 127.0.0.1:1"
        in result.stdout
    )
