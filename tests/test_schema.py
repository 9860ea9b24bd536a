"""``sql/schema.sql`` is the schema the migrations give; named queries are found by name in their folders."""

from __future__ import annotations

import difflib

from billing.db.schema import SCHEMA_FILE, current_schema
from billing.db.sql import QUERIES_DIR, query_names


def test_schema_sql_matches_the_migrated_database(database_url: str) -> None:
    written, migrated = SCHEMA_FILE.read_text(), current_schema(database_url)
    diff = "".join(
        difflib.unified_diff(
            written.splitlines(keepends=True),
            migrated.splitlines(keepends=True),
            "sql/schema.sql",
            "migrated",
        )
    )
    assert diff == "", f"sql/schema.sql is stale: run `python -m billing.testing.write_schema`\n{diff}"


def test_named_queries_are_grouped_by_concern_and_named_once() -> None:
    loose = sorted(path.name for path in QUERIES_DIR.glob("*.sql"))
    assert loose == [], f"put these in a folder of sql/queries/ by concern: {loose}"
    # query_names raises on two files of one name in different folders.
    assert len(query_names()) == len(list(QUERIES_DIR.rglob("*.sql")))
