"""``python -m billing.testing.write_schema``: write ``sql/schema.sql`` from a freshly migrated throwaway database.

Run it after adding a migration; tests/test_schema.py fails until the file matches (billing.db.schema).
"""

from __future__ import annotations

import sys

from billing.db.schema import SCHEMA_FILE, current_schema
from billing.testing.scratch import scratch_database


def main() -> int:
    with scratch_database(prefix="billing_schema") as url:
        text = current_schema(url)
    SCHEMA_FILE.write_text(text)
    print(f"wrote {SCHEMA_FILE} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
