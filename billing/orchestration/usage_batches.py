"""Usage batches: parse pushed counter rows, stage them in PostgreSQL, read a batch's answer back.

``usage-sync/{batch}`` is run by ``billing.orchestration.temporal.run_usage_sync``.

Shared by the HTTP API, the benchmark and the tests, so that all three exercise the same path.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from billing.db.sql import query
from billing.models import MAX_TAG_LENGTH, refuse_control_characters

MAX_ROWS = 100_000
FIELDS = ("project_id", "tag", "created_at", "updated_at", "increment")
_MAX_BIGINT = 2**63 - 1
# Rows dated before this are rejected (1900, year 0 ...); the upper bound (the database clock plus the
# allowed skew, and a month that has begun) is checked by the apply, against the database clock.
EARLIEST_ROW_TIME = datetime(2000, 1, 1, tzinfo=UTC)

StagedRow = tuple[str, int, uuid.UUID, str, datetime, datetime, int]


@dataclass
class ParsedBatch:
    """A push after parsing: its batch id, the rows to stage, and the rows refused while parsing."""

    batch_id: str
    received: int
    rows: list[StagedRow] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)


def batch_id_of(metrics: list[Any]) -> str:
    """SHA-256 of the rows in canonical JSON: the same rows pushed twice are the same batch."""
    canonical = json.dumps(metrics, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a lone surrogate ("\\ud800" in the JSON) must hash, not fail; its row is rejected.
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _short(value: object) -> str:
    """``repr`` of a refused value, cut short so a huge one is never echoed back whole."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _timestamp(name: str, value: object) -> datetime | str:
    """An ISO 8601 timestamp in UTC (a naive one is taken as UTC), or why it is refused.

    Refused: not a timestamp, not representable in UTC (``9999-12-31T23:59:59-14:00`` is in year 10000),
    or before 2000-01-01.
    """
    if not isinstance(value, str):
        return f"{name} is not an ISO 8601 timestamp: {_short(value)}"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return f"{name} is not an ISO 8601 timestamp: {_short(value)}"
    try:
        parsed = parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        return f"{name} is not between 2000-01-01 and now: {_short(value)}"
    if parsed < EARLIEST_ROW_TIME:
        return f"{name} is before 2000-01-01: {_short(value)}"
    return parsed


def _parse_row(batch_id: str, index: int, item: dict[str, Any]) -> StagedRow | str:
    """The row to stage, or why it is rejected. Tags and projects are checked by the apply (data)."""
    missing = [name for name in FIELDS if item.get(name) is None]
    if missing:
        return f"missing field {missing[0]}"
    try:
        project_id = uuid.UUID(item["project_id"]) if isinstance(item["project_id"], str) else None
    except ValueError:
        project_id = None
    if project_id is None:
        return f"project_id is not a UUID: {_short(item['project_id'])}"
    tag = item["tag"]
    if not isinstance(tag, str) or not tag:
        return f"tag must be a non-empty string, got {_short(tag)}"
    if len(tag) > MAX_TAG_LENGTH:
        return f"tag is longer than {MAX_TAG_LENGTH} characters: {_short(tag)}"
    try:
        refuse_control_characters(tag)
    except ValueError as exc:
        return f"tag {exc}: {_short(tag)}"
    increment = item["increment"]
    # bool is an int in Python, not in JSON's sense of a counter.
    if type(increment) is not int or not 0 <= increment <= _MAX_BIGINT:
        return f"increment must be a non-negative integer, got {_short(increment)}"
    created_at = _timestamp("created_at", item["created_at"])
    if isinstance(created_at, str):
        return created_at
    updated_at = _timestamp("updated_at", item["updated_at"])
    if isinstance(updated_at, str):
        return updated_at
    return (batch_id, index, project_id, tag, created_at, updated_at, increment)


def parse_metrics(metrics: list[dict[str, Any]]) -> ParsedBatch:
    """Split the (object) rows of a push into rows to stage and rejections by index."""
    batch = ParsedBatch(batch_id=batch_id_of(metrics), received=len(metrics))
    for index, item in enumerate(metrics):
        outcome = _parse_row(batch.batch_id, index, item)
        if isinstance(outcome, str):
            batch.rejected.append((index, outcome))
        else:
            batch.rows.append(outcome)
    return batch


# COPY in binary: psycopg dumps UUIDs, timestamps and integers in C, several times faster than
# formatting the text format in Python.
_COPY_TYPES = ["text", "int4", "uuid", "text", "timestamptz", "timestamptz", "int8"]


async def stage_batch(pool: AsyncConnectionPool, batch: ParsedBatch, *, source: str = "push") -> bool:
    """Stage the batch in one transaction (COPY); False when it was staged before, nothing written."""
    async with pool.connection() as conn, conn.transaction():
        claim = await conn.execute(
            query("stage_batch_claim"),
            {"batch_id": batch.batch_id, "source": source, "rows_received": batch.received},
        )
        if await claim.fetchone() is None:
            return False
        async with conn.cursor().copy(query("stage_batch_rows")) as copy:
            copy.set_types(_COPY_TYPES)
            for row in batch.rows:
                await copy.write_row(row)
        if batch.rejected:
            await conn.execute(
                query("stage_batch_rejections"),
                {
                    "batch_id": batch.batch_id,
                    "idx": [index for index, _ in batch.rejected],
                    "reasons": [reason for _, reason in batch.rejected],
                },
            )
    return True


async def batch_answer(pool: AsyncConnectionPool, batch_id: str) -> dict[str, list[dict[str, Any]]]:
    """``quota`` (every meter of every known project of the batch) and ``rejected``, from PostgreSQL."""
    params = {"batch_id": batch_id}
    async with pool.connection() as conn:
        quota = await (await conn.execute(query("batch_quota"), params)).fetchall()
        rejected = await (await conn.execute(query("batch_rejections"), params)).fetchall()
    return {"quota": quota, "rejected": rejected}


async def held_back_of(pool: AsyncConnectionPool, batch_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """What the batch holds back and why: one entry per org (``org_id``, ``month``, ``reason``)."""
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(query("batch_skips"), {"batch_id": batch_id, "limit": limit})
        ).fetchall()
    return [dict(row) for row in rows]
