"""Numbers, sizes and times as the CLI prints them to people (``--json`` keeps the raw values)."""

from __future__ import annotations

from datetime import UTC, datetime

GIB = 1024**3


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 report``, ``2 reports``; ``many`` for irregular plurals."""
    return f"{count:,} {word if count == 1 else (many or word + 's')}"


def verb(count: int, singular: str, many: str) -> str:
    """The verb agreeing with ``count``: ``1 report waits``, ``2 reports wait``."""
    return singular if count == 1 else many


def gib(size: int) -> str:
    """Bytes in GiB with up to two decimals (``1.5 GiB``, ``1 GiB``, ``0 GiB``; ``<0.01 GiB`` above 0)."""
    if 0 < size < GIB / 100:
        return "<0.01 GiB"  # never "0 GiB" for something that is there (1 byte over is over)
    text = f"{size / GIB:,.2f}".rstrip("0").rstrip(".")
    return f"{text} GiB"


def iso(moment: datetime | int | float | None) -> str:
    """A time as ISO 8601 in UTC to the second (``2026-11-30T23:15:00Z``); epoch seconds accepted."""
    if moment is None:
        return "-"
    if isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
