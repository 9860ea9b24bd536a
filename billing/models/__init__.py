"""Models that cross a boundary: workflow, activity, signal and query inputs and outputs.

Temporal payloads are capped at 2 MB, so these carry IDs and small summaries, never tables.
Every workflow and activity takes one model and returns one model.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from billing.domain.months import MONTH_PATTERN

# Bounds of what input may carry into SQL: bigint columns, and text columns of names, tags and ids.
MAX_BIGINT = 2**63 - 1
MAX_NAME_LENGTH = 200
MAX_TAG_LENGTH = 200
MAX_ID_LENGTH = 255


def refuse_control_characters(value: str) -> str:
    """``value`` unless it holds a control character (NUL, newline, DEL, ...) or a lone surrogate
    (JSON's ``"\\ud800"``, which no UTF-8 column can store): those are refused."""
    for char in value:
        code = ord(char)
        if code < 0x20 or 0x7F <= code < 0xA0:
            raise ValueError(f"must not contain control characters (found U+{code:04X})")
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"must be valid Unicode (found a lone surrogate U+{code:04X})")
    return value


# Strict: a JSON integer only (no booleans, strings or floats), in the range of a bigint column.
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_BIGINT)]
# Text that reaches a text column: bounded, and without control characters (PostgreSQL refuses NUL).
Name = Annotated[
    str, StringConstraints(strict=True, max_length=MAX_NAME_LENGTH), AfterValidator(refuse_control_characters)
]
Tag = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=MAX_TAG_LENGTH),
    AfterValidator(refuse_control_characters),
]


class Model(BaseModel):
    """Base of every boundary model: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class MonthlyResetInput(Model):
    """Close ``org_id``'s month before ``month`` and open ``month`` (``YYYY-MM``)."""

    org_id: str
    month: str = Field(pattern=MONTH_PATTERN)


class MonthlyResetResult(Model):
    """What a monthly reset did. ``claimed`` is false when the month had already been reset."""

    org_id: str
    month: str
    closed_month: str
    claimed: bool
    tags_closed: int
    flags: int


class MonthlyCloseInput(Model):
    """Start the monthly resets of every org with usage in the month before ``month``.

    ``month`` defaults to the UTC month in which the workflow runs (the schedule fires on the 1st).
    The other fields carry progress across continue-as-new.
    """

    month: str | None = Field(default=None, pattern=MONTH_PATTERN)
    after_org_id: str | None = None
    started: int = 0
    already_started: int = 0


class MonthlyCloseResult(Model):
    """How many resets a monthly close started, and how many already existed."""

    month: str
    started: int
    already_started: int


class StartResetsInput(Model):
    """One page of orgs (ordered by id, after ``after_org_id``) whose ``month`` reset to start."""

    month: str = Field(pattern=MONTH_PATTERN)
    after_org_id: str | None = None
    page_size: int = Field(default=500, ge=1, le=5000)


class StartResetsResult(Model):
    """The outcome of one page; ``last_org_id`` is the cursor for the next, ``None`` when done."""

    started: int
    already_started: int
    last_org_id: str | None


class PurgeInput(Model):
    """One purge pass (the retention workflow's activity): at most ``max_chunks`` DELETEs of at most
    ``chunk`` rows each, every DELETE its own transaction."""

    chunk: int = Field(default=2000, ge=1, le=50_000)
    max_chunks: int = Field(default=200, ge=1, le=10_000)


class PurgeResult(Model):
    """What a purge pass deleted, and whether anything past the retention is left (``more``)."""

    batch_rows: int = 0
    batch_rejections: int = 0
    batches: int = 0
    webhook_events: int = 0
    more: bool = False


class RetentionInput(Model):
    """The ``retention-daily`` schedule's argument; the totals carry progress across continue-as-new."""

    chunk: int = Field(default=2000, ge=1, le=50_000)
    totals: PurgeResult = PurgeResult()
