"""SQL lives in ``sql/`` as files; code refers to statements by name, never builds them.

``sql/`` ships inside the wheel as the package ``billing_sql`` (pyproject maps it), so a plain
``pip install .`` finds it through importlib.resources; a source checkout that is not installed
falls back to the repository's ``sql/``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path


def _sql_dir() -> Path:
    try:
        return Path(str(resources.files("billing_sql")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "sql"


SQL_DIR = _sql_dir()
QUERIES_DIR = SQL_DIR / "queries"


@cache
def query(name: str) -> str:
    """The text of ``sql/queries/{name}.sql``."""
    return (QUERIES_DIR / f"{name}.sql").read_text()


def migration_files() -> list[Path]:
    """The numbered migrations ``sql/NNNN_*.sql``, in the order they apply."""
    return sorted(SQL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
