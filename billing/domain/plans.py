"""The plans an organization can be on: the one list the API, the models and the reducer share.

``sql/0001_schema.sql`` holds the same three names in the ``plans`` table's CHECK (a migration that
is checksummed, so it is not rewritten); tests/test_migrate.py checks the database agrees.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

Plan = Literal["free", "pro", "team"]
PLANS: Final[tuple[str, ...]] = get_args(Plan)
