"""`billing overview` and `billing notifications`: what an operator reads first."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from billing.observability.metrics import read_overview


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h" if hours < 48 else f"{hours // 24} d"


async def load_overview(pool: AsyncConnectionPool, limit: int = 20) -> dict[str, Any]:
    """The overview as JSON-ready data (see sql/queries/read/overview.sql)."""
    row = await read_overview(pool, limit)
    by_status = row["orgs_by_payment_status"]
    return {
        "month": row["month"],
        "orgs": {
            "blocked": by_status.get("blocked", 0),
            "past_due": by_status.get("past_due", 0),
            "not_ok": row["orgs_not_ok"],
        },
        "stripe_outbox": {
            "by_state": row["reports_by_state"],
            "oldest_pending_seconds": row["oldest_pending_report_seconds"],
        },
        "resets": {"done": row["resets_done"], "missing": row["resets_missing"]},
        "webhooks": {"backlog": row["webhook_backlog"], "oldest_seconds": row["oldest_webhook_seconds"]},
        "notifications": {
            "by_state": row["notifications_by_state"],
            "oldest_open_seconds": row["oldest_open_notification_seconds"],
        },
    }


def overview_text(view: dict[str, Any]) -> str:
    """The overview on one screen."""
    orgs, outbox, resets = view["orgs"], view["stripe_outbox"], view["resets"]
    hooks, notes = view["webhooks"], view["notifications"]
    states = ", ".join(f"{state} {n}" for state, n in sorted(outbox["by_state"].items())) or "empty"
    note_states = ", ".join(f"{state} {n}" for state, n in sorted(notes["by_state"].items())) or "none"
    lines = [
        f"month {view['month']} (UTC)",
        f"orgs: {orgs['blocked']} blocked, {orgs['past_due']} past due",
    ]
    lines += [
        f"  {org['payment_status']:<9} {org['org_id']}  {org['reason'] or ''}".rstrip()
        for org in orgs["not_ok"]
    ]
    lines += [
        f"stripe outbox: {states}; oldest pending: {_age(outbox['oldest_pending_seconds'])}",
        f"monthly resets {view['month']}: {resets['done']} done, {resets['missing']} missing",
        f"stripe webhooks not applied yet: {hooks['backlog']} (oldest: {_age(hooks['oldest_seconds'])})",
        f"notifications: {note_states}; oldest undelivered: {_age(notes['oldest_open_seconds'])}",
    ]
    return "\n".join(lines)


def notifications_text(org_id: str, rows: list[dict[str, Any]], configured: bool) -> str:
    """An org's notifications, newest first, one line each."""
    lines = [
        f"notifications of org {org_id}"
        + ("" if configured else " (BILLING_NOTIFY_URL not set: not delivered)")
    ]
    if not rows:
        lines.append("  none yet")
    for row in rows:
        data = row["payload"]
        if row["kind"] == "usage.threshold_crossed":
            what = f"{data['meter']} reached {data['threshold_percent']}% of {data['included']:,} in {data['month']}"
        else:
            what = f"{data.get('from')} -> {data.get('to')}"
        error = f" ({row['last_error']})" if row["last_error"] and row["state"] != "delivered" else ""
        lines.append(
            f"  #{row['id']:<6} {row['created_at'][:19]}  {row['kind']:<24} {what}  "
            f"[{row['state']}, {row['attempts']} attempt{'s' if row['attempts'] != 1 else ''}]{error}"
        )
    return "\n".join(lines)
