"""The one place Python code outside workflows reads the time (workflows use ``workflow.now()``).

Tests move it with :func:`frozen_at`; SQL has its counterpart, ``billing_now()`` (``sql/0007_clock.sql``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

from billing.domain.months import month_key

_frozen: datetime | None = None


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (or the time a test froze)."""
    return _frozen if _frozen is not None else datetime.now(UTC)


@contextlib.contextmanager
def frozen_at(moment: datetime) -> Iterator[None]:
    """Make :func:`utcnow` answer ``moment`` (aware) while the block runs; for tests."""
    global _frozen
    if moment.tzinfo is None:
        raise ValueError("frozen_at needs an aware datetime")
    previous, _frozen = _frozen, moment.astimezone(UTC)
    try:
        yield
    finally:
        _frozen = previous


def current_month(now: datetime | None = None) -> str:
    """The UTC month (``YYYY-MM``) of ``now`` (default: :func:`utcnow`); workflows pass ``workflow.now()``."""
    return month_key(now or utcnow())
