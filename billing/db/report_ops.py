"""Operator acts on Stripe report rows: void, mark sent, send again. Each is recorded (who, when, why).

These are the only ways a queued row leaves the automatic path: a void is the only way a queued row is
not sent; ``mark_sent`` settles an ``uncertain`` row Stripe counted (``billing reconcile`` shows it);
``resend`` sends a ``failed`` or ``uncertain`` row again under a new identifier derived from the old one
(so Stripe's dedupe cannot swallow it, and the old identifier stays on the row).
"""

from __future__ import annotations

from typing import Literal

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from billing.core.errors import UserError
from billing.db.sql import query

Action = Literal["void", "mark_sent", "resend"]

# Which states each act applies to; anything else is refused and nothing changes.
ALLOWED_FROM: dict[str, frozenset[str]] = {
    "void": frozenset({"pending", "failed", "uncertain"}),
    "mark_sent": frozenset({"uncertain"}),
    "resend": frozenset({"failed", "uncertain"}),
}


class ActedRow(BaseModel):
    """One row an operator act changed."""

    identifier: str
    new_identifier: str | None = None


async def act_on_rows(
    pool: AsyncConnectionPool,
    org_id: str,
    identifiers: list[str],
    action: Action,
    *,
    actor: str,
    reason: str,
) -> list[ActedRow]:
    """Apply ``action`` to the org's rows named by ``identifiers``, all or none, in one transaction.

    Raises UserError (nothing changed) when a row is unknown or not in a state the act applies to.
    """
    if not identifiers:
        raise UserError("name at least one report row (its identifier, as `billing report-list` shows)")
    if not reason.strip() or not actor.strip():
        raise UserError("an operator act needs a reason and who did it")
    async with pool.connection() as conn, conn.transaction():
        rows = await (
            await conn.execute(
                query("report_rows_for_action"), {"org_id": org_id, "identifiers": list(identifiers)}
            )
        ).fetchall()
        found = {row["identifier"]: row for row in rows}
        missing = [i for i in identifiers if i not in found]
        if missing:
            raise UserError(f"org {org_id} has no report row {missing[0]!r}")
        wrong = [row for row in rows if row["status"] not in ALLOWED_FROM[action]]
        if wrong:
            allowed = ", ".join(sorted(ALLOWED_FROM[action]))
            raise UserError(
                f"report row {wrong[0]['identifier']} is {wrong[0]['status']}; "
                f"{action.replace('_', '-')} applies to {allowed} rows only"
            )
        acted = await (
            await conn.execute(
                query("report_operator_act"),
                {
                    "org_id": org_id,
                    "ids": [row["id"] for row in rows],
                    "from_statuses": [row["status"] for row in rows],
                    "action": action,
                    "actor": actor,
                    "reason": reason,
                },
            )
        ).fetchall()
    return [ActedRow(identifier=a["old_identifier"], new_identifier=a["new_identifier"]) for a in acted]
