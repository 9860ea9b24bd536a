"""Migrations: each once, in order, safe with two migrators at once; an edited one is refused."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import psycopg
import pytest

from billing.core.errors import MigrationError
from billing.db.migrate import migrate
from billing.db.sql import migration_files
from billing.domain.plans import PLANS
from tests.conftest import fresh_database


def test_migrations_apply_once_and_a_second_run_applies_nothing(postgres_admin_url: str) -> None:
    with fresh_database(postgres_admin_url, migrated=False) as url:
        first = migrate(url)
        second = migrate(url)
        assert first.applied == [path.name for path in migration_files()]
        assert second.applied == []
        assert second.already_applied == first.applied
        with psycopg.connect(url) as conn:
            meters = conn.execute("SELECT count(*) FROM meters").fetchone()
            plans = conn.execute("SELECT array_agg(name ORDER BY name) FROM plans").fetchone()
        assert meters == (5,)
        assert plans == (list(PLANS),)


def test_two_migrators_at_once_apply_each_migration_once(postgres_admin_url: str) -> None:
    with fresh_database(postgres_admin_url, migrated=False) as url:
        barrier = threading.Barrier(2)
        reports, errors = [], []

        def run() -> None:
            barrier.wait()
            try:
                reports.append(migrate(url))
            except Exception as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        applied = sorted(name for report in reports for name in report.applied)
        assert applied == sorted(path.name for path in migration_files())
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert rows == (len(migration_files()),)


def test_a_migration_edited_after_it_was_applied_is_refused(postgres_admin_url: str, tmp_path: Path) -> None:
    for path in migration_files():
        shutil.copy(path, tmp_path / path.name)
    copies = sorted(tmp_path.glob("*.sql"))
    with fresh_database(postgres_admin_url, migrated=False) as url:
        migrate(url, copies)
        edited = copies[1]
        edited.write_text(edited.read_text() + "\n-- a later edit\n")
        with pytest.raises(MigrationError, match=f"migration {edited.name} was edited after it was applied"):
            migrate(url, copies)
