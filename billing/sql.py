"""SQL lives in ``sql/`` as files; code refers to statements by name, never builds them."""

from __future__ import annotations

from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
QUERIES_DIR = SQL_DIR / "queries"


@cache
def query(name: str) -> str:
    """The text of ``sql/queries/{name}.sql``."""
    return (QUERIES_DIR / f"{name}.sql").read_text()


def migration_files() -> list[Path]:
    """The numbered migrations ``sql/NNNN_*.sql``, in the order they apply."""
    return sorted(SQL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
