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
def _query_files() -> dict[str, Path]:
    """Query name -> file: ``sql/queries/{concern}/{name}.sql`` (or directly in queries/); names are
    unique across the folders, so a query moves between them without its callers changing."""
    found: dict[str, Path] = {}
    for path in sorted(QUERIES_DIR.rglob("*.sql")):
        if path.stem in found:
            raise RuntimeError(f"two queries named {path.stem!r}: {found[path.stem]} and {path}")
        found[path.stem] = path
    return found


@cache
def query(name: str) -> str:
    """The text of the named query, ``sql/queries/**/{name}.sql``."""
    try:
        return _query_files()[name].read_text()
    except KeyError:
        raise KeyError(f"no query {name!r} under {QUERIES_DIR}") from None


def query_names() -> list[str]:
    """Every named query, for checks."""
    return sorted(_query_files())


def migration_files() -> list[Path]:
    """The numbered migrations ``sql/NNNN_*.sql``, in the order they apply."""
    return sorted(SQL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
