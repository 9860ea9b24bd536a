"""UTC hours as used in ``stripe-report/{org_id}/{YYYY-MM-DDTHH}`` workflow IDs and outbox rows."""

from __future__ import annotations

import re
from datetime import UTC, datetime

HOUR_PATTERN = r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3])$"
_HOUR = re.compile(HOUR_PATTERN)


def parse_hour(text: str) -> datetime:
    """``"2026-11-03T14"`` -> ``datetime(2026, 11, 3, 14, tzinfo=UTC)``; ValueError for anything else."""
    if not _HOUR.match(text):
        raise ValueError(f"expected a UTC hour as YYYY-MM-DDTHH, got {text!r}")
    return datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=UTC)


def hour_key(moment: datetime) -> str:
    """The ``YYYY-MM-DDTHH`` of an aware datetime, taken in UTC (naive datetimes are taken as UTC)."""
    moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return f"{moment:%Y-%m-%dT%H}"
