"""UTC months as used in workflow IDs (``YYYY-MM``) and in SQL (the first day of the month)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

# A month as text, here and in the models' fields (pydantic patterns).
MONTH_PATTERN = r"^\d{4}-(0[1-9]|1[0-2])$"
_MONTH = re.compile(MONTH_PATTERN)


def parse_month(text: str) -> date:
    """``"2026-11"`` -> ``date(2026, 11, 1)``; ValueError for anything else."""
    match = _MONTH.match(text)
    if not match:
        raise ValueError(f"expected a month as YYYY-MM, got {text!r}")
    return date(int(text[:4]), int(match[1]), 1)


def month_key(day: date | datetime) -> str:
    """The ``YYYY-MM`` of a date, or of a datetime taken in UTC."""
    if isinstance(day, datetime):
        day = day.astimezone(UTC) if day.tzinfo else day
    return f"{day.year:04d}-{day.month:02d}"


def previous_month(month: str) -> str:
    """The month before ``month`` (both ``YYYY-MM``)."""
    first = parse_month(month)
    year, mon = (first.year, first.month - 1) if first.month > 1 else (first.year - 1, 12)
    return f"{year:04d}-{mon:02d}"

