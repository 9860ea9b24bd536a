"""Apply ``sql/NNNN_*.sql`` migrations in order, each once, each in its own transaction.

Two migrators at once are safe: both take one advisory lock before reading what is applied. Each
applied migration is recorded with the SHA-256 of its text; a migration edited afterwards is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from billing.core.errors import MigrationError
from billing.db.pool import check_connect
from billing.db.sql import migration_files

# Any constant works; it only has to be the same for every migrator of this schema.
_ADVISORY_LOCK_KEY = 0x6269_6C6C  # "bill"

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class MigrationReport:
    """What one run did: migrations newly applied and those already there."""

    applied: list[str]
    already_applied: list[str]


def checksum(path: Path) -> str:
    """SHA-256 of a migration's text."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def migrate(url: str, files: list[Path] | None = None) -> MigrationReport:
    """Apply every migration not yet applied; MigrationError for an edited one."""
    files = migration_files() if files is None else files
    applied: list[str] = []
    already: list[str] = []
    with check_connect(url) as conn:
        conn.autocommit = True
        conn.execute("SELECT pg_advisory_lock(%s)", [_ADVISORY_LOCK_KEY])
        try:
            conn.execute(_CREATE_LEDGER)
            done = {
                row["name"]: row["checksum"]
                for row in conn.execute("SELECT name, checksum FROM schema_migrations").fetchall()
            }
            for path in files:
                digest = checksum(path)
                if path.name in done:
                    if done[path.name] != digest:
                        raise MigrationError(
                            f"migration {path.name} was edited after it was applied "
                            f"(recorded checksum {done[path.name][:12]}, file now {digest[:12]}); "
                            "add a new migration instead of editing an applied one"
                        )
                    already.append(path.name)
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute(
                        "INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)", [path.name, digest]
                    )
                applied.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [_ADVISORY_LOCK_KEY])
    return MigrationReport(applied=applied, already_applied=already)
