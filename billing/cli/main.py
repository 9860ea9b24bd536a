"""The ``billing`` command line. Every failure a user can fix is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn

from billing.core.config import Settings
from billing.core.errors import UserError
from billing.domain.ids import canonical_uuid
from billing.read.humanize import gib, iso, plural, verb

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; a user wants the one line that says what is wrong.
        self.exit(EXIT_USAGE, f"billing: error: {message} (see `{self.prog} --help`)\n")


def _org_id(value: str) -> str:
    try:
        return canonical_uuid(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ORG_ID must be a UUID, got {value!r}") from None


def _month(value: str) -> str:
    from billing.domain.months import parse_month

    try:
        parse_month(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _reason(value: str) -> str:
    from billing.models.org_billing import MAX_REASON_LENGTH

    text = value.strip()
    if not text:
        raise argparse.ArgumentTypeError("--reason must not be empty")
    if len(text) > MAX_REASON_LENGTH:
        raise argparse.ArgumentTypeError(f"--reason is longer than {MAX_REASON_LENGTH} characters")
    return text


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


# --- commands ----------------------------------------------------------------------------------


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Apply migrations, then register search attributes and schedules unless --sql-only."""
    from billing.db.migrate import migrate
    from billing.orchestration.temporal import connect, ensure_schedules, register_search_attributes

    report = migrate(settings.require_database_url())
    for name in report.applied:
        print(f"applied {name}")
    print(f"migrations: {len(report.applied)} applied, {len(report.already_applied)} already applied")
    if not args.sql_only:
        client = await connect(settings)
        added = await register_search_attributes(client, settings.temporal_namespace)
        schedules = await ensure_schedules(client, settings.task_queue)
        print(f"search attributes: {', '.join(added) or 'already registered'}")
        print(f"schedules: {', '.join(schedules)}")
    return 0


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run a worker until Ctrl-C."""
    from billing.cli.services import open_services, serve_until_stopped, stop_event

    async with open_services(settings, pool_size=20, worker_metrics=True) as services:
        print(f"worker on task queue {settings.task_queue!r} at {settings.temporal_address}", flush=True)
        await serve_until_stopped(services, run_worker=True, run_api=False, stop=stop_event())
    return 0


async def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the HTTP API until Ctrl-C."""
    from billing.cli.services import open_services, serve_until_stopped, stop_event

    settings.require_api_token()
    async with open_services(settings) as services:
        await serve_until_stopped(
            services,
            run_worker=False,
            run_api=True,
            stop=stop_event(),
            on_ready=lambda: print(f"API on http://{settings.http_addr}", flush=True),
        )
    return 0


async def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """Run the whole system on embedded defaults (see billing/cli/devstack.py)."""
    from billing.cli.devstack import run_dev

    return await run_dev(
        settings,
        data_dir=args.data_dir,
        temporal_port=args.temporal_port,
        ui_port=args.ui_port,
        with_parent=args.exit_with_parent,
    )


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Print one org's plan, payment status, usage against limits, reports and workflows."""
    from billing.core.clock import current_month
    from billing.core.errors import ConfigError
    from billing.db.pool import database_pool
    from billing.orchestration.temporal import connect
    from billing.read.status import add_temporal_view, load_org_status

    async with database_pool(settings, max_size=2) as pool:
        status = await load_org_status(
            pool,
            args.org_id,
            args.month or current_month(),
            stripe_configured=settings.stripe_api_key is not None,
        )
    if status is None:
        raise UserError(f"organization {args.org_id} does not exist")
    try:
        client = await connect(settings)
    except ConfigError as exc:
        client = None
        unreachable = str(exc)
    await add_temporal_view(status, client)
    if client is None:
        status.temporal_error = unreachable
    if args.json:
        print(status.model_dump_json(indent=2))
        return 0
    print(f"org {status.org_id} ({status.name or 'unnamed'})")
    print(f"  plan: {status.plan}" + (f" -> {status.pending_plan} pending" if status.pending_plan else ""))
    reason = f" ({status.payment_status_reason})" if status.payment_status_reason else ""
    print(f"  payment status: {status.payment_status}{reason}")
    if status.period_end:
        print(f"  period end: {iso(status.period_end)}")
    # Quota flags are the org's current ones: shown on the current month only.
    current = status.month == current_month()
    print(
        f"  usage {status.month}:"
        + ("" if current else " (quota flags are current: not shown for a past month)")
    )
    for meter in status.usage:
        print(f"    {_usage_line(meter, status.plan, status.payment_status if current else None)}")
    print(f"  stripe reporting: {status.stripe_reporting}")
    for report in status.stripe_reports:
        why = f" (last: {report.last_reason})" if report.last_reason else ""
        print(
            f"    {report.status}: {plural(report.reports, 'report')}, {plural(report.quantity, 'unit')}{why}"
        )
    for error in status.stripe_meter_errors:
        whose = "unmatched, any org" if error["unmatched"] else "this org"
        print(
            f"    Stripe meter error {error['event_id']} ({whose}): {error['code']}, "
            f"{plural(error['error_count'], 'event')}: {error['message']}"
        )
    for act in status.stripe_report_actions:
        new = f" as {act['new_identifier']}" if act["new_identifier"] else ""
        print(
            f"    {iso(act['at'])} {act['actor']} {act['action']} {act['old_identifier']}{new}: "
            f"{act['reason']}"
        )
    print(f"  resets: {', '.join(status.recent_resets) or 'none yet'}")
    for event in status.webhook_events_not_applied:
        print(f"  Stripe event not applied ({event['status']}): {event['event_id']} {event['event_type']}: "
              f"{event['detail']}")  # fmt: skip
    if status.temporal_error:
        print(f"  workflows and payment state machine: unknown, {status.temporal_error}")
        return 0
    if not status.workflows:
        print("  workflows: none yet")
    else:
        print("  workflows:")
    for wf in status.workflows:
        print(f"    {wf.status:<11} {wf.workflow_id}  (started {iso(wf.started_at)})")
    _print_payment_state(status.payment_state)
    return 0


def _usage_line(meter: Any, plan: str, payment_status: str | None) -> str:
    """One meter's usage against its limit; storage in GiB; a flag says why (``payment_status`` None: no flag)."""

    def amount(value: int) -> str:
        return gib(value) if meter.tag == "storage.usage" else f"{value:,}"

    limit = "unlimited" if meter.included is None else amount(meter.included)
    over = f"  over by {amount(meter.over_by)}" if meter.over_by and meter.included is not None else ""
    flag = ""
    if meter.excess and payment_status is not None:
        why = []
        if meter.over_by and plan == "free":
            why.append("over the free plan's limit")
        if payment_status == "blocked":
            why.append("org payment-blocked")
        flag = "  EXCESS" + (f" ({', '.join(why)})" if why else "")
    return f"{meter.tag:<30} {amount(meter.used):>16} / {limit}{over}{flag}"


def _print_payment_state(view: Any) -> None:
    """The org-billing workflow's view (its `state` query), as `billing status`, `block`, `unblock` show it."""
    if view is None:
        print(
            "  payment state machine: org-billing workflow not started (no Stripe event or operator action yet)"
        )
        return
    pending = f", pending {view.pending_plan}" if view.pending_plan else ""
    print(
        f"  payment state machine (org-billing/{view.org_id}): {view.payment_status}, plan {view.plan}{pending}"
    )
    for reason in view.status_reasons:
        print(f"    why: {reason}")
    for failed in view.failed_invoices:
        print(f"    open {failed.kind} failure: {failed.invoice_id}: {failed.reason}")
    if view.last_stripe_refusal is not None:
        refusal = view.last_stripe_refusal
        print(
            f"    last Stripe refusal at {iso(refusal.at)}: {refusal.action} of {refusal.subscription_id}: "
            f"{refusal.message}"
        )
    print(f"    events applied: {view.events_applied}, queued: {view.queued}")
    for recent in view.recent_events[-5:]:
        # An operator action's id is made of its type and epoch seconds: the time says it better.
        source = "" if recent.id.startswith("operator:") else f" {recent.id}"
        print(f"    recent: {recent.type}{source} at {iso(recent.created)}: {recent.outcome}")


OPERATOR_TIMEOUT_SECONDS = 60.0


async def _operator(args: argparse.Namespace, settings: Settings, action: str) -> int:
    """Update-with-start the org workflow with an operator action; print the state once it is enforced.

    The update returns only after the billing row and the quota flags are committed, so when this
    prints, the gateway already answers accordingly. After an unblock, any flag that still refuses the
    org's writes (a free plan over its limit) is named.
    """
    from billing.cli.services import open_services
    from billing.db.sql import query
    from billing.models.org_billing import OperatorRequest
    from billing.orchestration.temporal import operator_update

    request = OperatorRequest(reason=args.reason, request_id=uuid.uuid4().hex)
    async with open_services(settings, pool_size=1) as services:
        async with services.pool.connection() as conn:
            row = await (await conn.execute(query("org_exists"), {"org_id": args.org_id})).fetchone()
        if not row or not row["found"]:
            raise UserError(f"organization {args.org_id} does not exist")
        try:
            view = await asyncio.wait_for(
                operator_update(services.client, settings.task_queue, args.org_id, action, request),
                OPERATOR_TIMEOUT_SECONDS,
            )
        except TimeoutError:
            raise UserError(
                f"{action} of org {args.org_id} not confirmed within {OPERATOR_TIMEOUT_SECONDS:.0f} s, so it "
                f"may not be enforced yet; is a worker running on task queue {settings.task_queue!r}? "
                "Run the command again (it applies once) or check `billing status`"
            ) from None
        async with services.pool.connection() as conn:
            cursor = await conn.execute(query("org_flagged_projects"), {"org_id": args.org_id})
            flags = await cursor.fetchall()
    still = sorted({f"{flag['tag']} ({flag['reason']})" for flag in flags})
    if args.json:
        print(view.model_dump_json(indent=2))
    else:
        print(
            f"operator {action} applied to org {args.org_id} and enforced (billing row and quota flags written)"
        )
        if action == "unblock" and still:
            remain = verb(len(flags), "remains", "remain")
            print(f"  still refused: {plural(len(flags), 'project flag')} {remain}: {', '.join(still)}")
        _print_payment_state(view)
    if action == "unblock" and still and args.json:
        print(f"billing: note: still refused: {', '.join(still)}", file=sys.stderr)
    return 0


async def cmd_block(args: argparse.Namespace, settings: Settings) -> int:
    """Block an org (every project flagged) until an operator unblocks it; returns once enforced."""
    return await _operator(args, settings, "block")


async def cmd_unblock(args: argparse.Namespace, settings: Settings) -> int:
    """Lift an operator block and every open metered failure of an org; returns once enforced."""
    return await _operator(args, settings, "unblock")


async def _clock_now(settings: Settings) -> datetime:
    """The database clock (``billing_now()``) when DATABASE_URL is set, else this machine's UTC clock."""
    import psycopg

    from billing.core.clock import utcnow
    from billing.core.errors import ConfigError
    from billing.db.pool import database_pool

    if not settings.database_url:
        return utcnow()
    try:
        async with database_pool(settings, max_size=1) as pool, pool.connection() as conn:
            row = await (await conn.execute("SELECT billing_now() AS now")).fetchone()
    except (ConfigError, psycopg.Error):
        return utcnow()  # the reset itself reports an unreachable database; the SQL claim checks again
    return row["now"] if row else utcnow()


async def cmd_reset(args: argparse.Namespace, settings: Settings) -> int:
    """Start (or find) ``monthly-reset/{org}/{month}`` and report what happened.

    A month after the current UTC month is refused (exit 2); a reset whose run did not complete
    (failed, terminated, cancelled, timed out) is run again, and the output says so.
    """
    from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError

    from billing.models import MonthlyResetResult
    from billing.orchestration.temporal import (
        MonthNotBegun,
        connect,
        refuse_unbegun_month,
        start_monthly_reset,
    )

    try:
        refuse_unbegun_month(args.month, await _clock_now(settings))
    except MonthNotBegun as exc:
        raise UserError(str(exc)) from None
    client = await connect(settings)
    outcome = await start_monthly_reset(
        client, settings.task_queue, args.org_id, args.month, check_month=False
    )
    handle = client.get_workflow_handle(outcome.workflow_id, result_type=MonthlyResetResult)
    if not outcome.started and outcome.status == WorkflowExecutionStatus.RUNNING:
        result = {"workflow_id": outcome.workflow_id, "outcome": "already in progress"}
        _print(result, args.json, f"{outcome.workflow_id}: already in progress")
        return 0
    if not outcome.started and outcome.status != WorkflowExecutionStatus.COMPLETED:
        state = outcome.status.name.lower() if outcome.status else "unknown"
        raise UserError(f"{outcome.workflow_id} exists and is {state}; see it in the Temporal UI")
    if not outcome.started:
        result = {"workflow_id": outcome.workflow_id, "outcome": "already done"}
        _print(result, args.json, f"{outcome.workflow_id}: already done")
        return 0
    rerun = " (rerun: the previous run did not complete)" if outcome.rerun else ""
    if args.no_wait:
        _print(
            {"workflow_id": outcome.workflow_id, "outcome": "started", "rerun": outcome.rerun},
            args.json,
            f"{outcome.workflow_id}: started{rerun}",
        )
        return 0
    try:
        reset = await handle.result()
    except WorkflowFailureError as exc:
        raise UserError(f"{outcome.workflow_id} failed: {exc.cause or exc}") from None
    verdict = "done" if reset.claimed else "already done"
    text = f"{outcome.workflow_id}: {verdict}{rerun}" + (
        f"; closed {reset.closed_month} ({plural(reset.tags_closed, 'meter')}), "
        f"{plural(reset.flags, 'quota flag')}"
        if reset.claimed
        else ""
    )
    _print(
        {
            "workflow_id": outcome.workflow_id,
            "outcome": verdict,
            "rerun": outcome.rerun,
            **reset.model_dump(),
        },
        args.json,
        text,
    )
    return 0


async def cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    """Run one pull of the core service's metrics table now, through Temporal, and say what it did."""
    from billing.orchestration.temporal import run_pull_now

    result = await run_pull_now(settings)
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    print(result.message)
    if result.sync is not None:
        sync = result.sync
        print(f"  batch {sync.batch_id}: {sync.rows_applied} rows applied, {sync.rows_rejected} rejected,")
        print(f"  {sync.overage_reports} overage reports queued, {sync.orgs_applied} orgs applied")
        for skip in sync.skipped_orgs:
            print(f"  skipped org {skip.org_id} ({skip.month}): {skip.reason}")
    if result.watermark is not None:
        print(f"  watermark: {result.watermark.isoformat()}")
    return 0


async def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Compare the org's sent Stripe reports with Stripe's meter summaries; exit 1 when any differs."""
    import stripe

    from billing.adapters.stripe_client import make_stripe_client
    from billing.core.errors import ConfigError
    from billing.db.pool import database_pool
    from billing.read.reconcile import reconcile

    stripe_client = make_stripe_client(settings)
    if stripe_client is None:
        raise ConfigError("STRIPE_API_KEY", "not set (reconcile compares the ledger with Stripe)")
    async with database_pool(settings, max_size=2) as pool:
        try:
            report = await reconcile(pool, stripe_client, args.org_id, args.month)
        except stripe.APIConnectionError:
            base = settings.stripe_api_base or "https://api.stripe.com"
            raise UserError(f"cannot reach Stripe at {base}; check the network or STRIPE_API_BASE") from None
        except stripe.StripeError as exc:
            raise UserError(
                f"Stripe answered {exc.http_status or 'nothing'}: {exc.user_message or exc}"
            ) from None
    if args.json:
        data = report.model_dump(mode="json")
        for meter in data["meters"]:
            for key in ("ledger", "stripe", "difference"):
                meter[key] = _number(meter[key])
        print(
            json.dumps(
                {**data, "unsettled_units": report.unsettled_units, "matches": report.matches},
                indent=2,
                default=str,
            )
        )
        return 0 if report.matches else 1
    print(
        f"org {report.org_id}, customer {report.stripe_customer_id}, {report.month} (ledger = sent reports)"
    )
    print(f"  {'meter':<22} {'ledger':>14} {'stripe':>14} {'difference':>12}")
    for meter in report.meters:
        note = f"  ({meter.note})" if meter.note else ""
        print(
            f"  {meter.event_name:<22} {meter.ledger:>14,} {meter.stripe:>14,} {meter.difference:>+12,}{note}"
        )
    differing = sum(1 for meter in report.meters if meter.difference != 0)
    print(
        "all meters match"
        if not differing
        else f"{plural(differing, 'meter')} {verb(differing, 'differs', 'differ')}"
    )
    if report.queued:
        states = ", ".join(f"{q.state} {q.quantity:,} ({q.reports})" for q in report.queued)
        print(f"  queued for {report.month}: {states}")
    if report.unsettled_units:
        unsettled = report.unsettled_units
        print(f"  {plural(unsettled, 'queued unit')} {verb(unsettled, 'is', 'are')} neither sent nor voided")
    for row in report.uncertain:
        print(
            f"  uncertain {row['identifier']} ({row['tag']}, {row['month']}, {row['quantity']:,}): "
            "counted by Stripe? `billing report-mark-sent`; missing? `billing report-resend`"
        )
    for error in report.meter_errors:
        print(f"  Stripe meter error {error['event_id']} ({error['code']}): {error['message']}")
    return 0 if report.matches else 1


async def cmd_report_pending(args: argparse.Namespace, settings: Settings) -> int:
    """Start stripe-report workflows now for orgs with pending reports (else the hourly job does)."""
    from billing.cli.services import open_services
    from billing.core.clock import utcnow
    from billing.db.sql import query
    from billing.orchestration.temporal import start_stripe_reports

    # No check of this shell's STRIPE_API_KEY: the workers send, and only their key matters (below).
    async with open_services(settings, pool_size=2) as services:
        org_ids: list[str] = []
        cursor: str | None = None
        async with services.pool.connection() as conn:
            while True:
                rows = await (
                    await conn.execute(
                        query("orgs_with_pending_reports"),
                        {"source": None, "after_org_id": cursor, "page_size": 1000},
                    )
                ).fetchall()
                org_ids += [row["org_id"] for row in rows]
                if len(rows) < 1000:
                    break
                cursor = rows[-1]["org_id"]
        if args.org_id:
            org_ids = [org_id for org_id in org_ids if org_id == args.org_id]
        starts = await start_stripe_reports(services.client, settings.task_queue, org_ids, utcnow())
        if starts.workflow_ids:
            await _refuse_if_workers_have_no_key(services.client, starts.workflow_ids[0])
    result = {"orgs": len(org_ids), "started": starts.started, "already_running": starts.already_running}
    text = (
        f"reports for {plural(len(org_ids), 'org')} with pending rows: {starts.started} started, "
        f"{starts.already_running} already running"
    )
    _print({**result, "workflow_ids": starts.workflow_ids}, args.json, text)
    return 0


async def _refuse_if_workers_have_no_key(client: Any, workflow_id: str) -> None:
    """UserError when the workers that run the reports have no STRIPE_API_KEY (nothing will be sent).

    Whether they have one is known only to them: a report run without a key completes at once saying
    so, so wait briefly for the first one; a run still busy after that is sending.
    """
    from billing.models.stripe_report import StripeReportResult

    handle = client.get_workflow_handle(workflow_id, result_type=StripeReportResult)
    try:
        result = await asyncio.wait_for(handle.result(), 10)
    except Exception:
        return  # still running (sending), or ended some other way the UI shows: not this question
    if not result.stripe_configured:
        raise UserError(
            f"nothing will be sent: the workers have no STRIPE_API_KEY, so {plural(result.pending, 'report')} "
            f"{verb(result.pending, 'stays', 'stay')} pending (none lost); set STRIPE_API_KEY where the "
            "workers run (the `make dev` shell) and restart them"
        )


async def cmd_system(args: argparse.Namespace, settings: Settings) -> int:
    """Sizes of what retention keeps: staged batches and their rows, recorded webhook events."""
    from datetime import UTC

    from billing.db.pool import database_pool
    from billing.db.sql import query

    retention = settings.retention
    async with database_pool(settings, max_size=1) as pool:
        async with pool.connection() as conn:
            cursor = await conn.execute(
                query("retention_sizes"), {"retention_seconds": retention.total_seconds()}
            )
            sizes = await cursor.fetchone()
    assert sizes is not None
    days = retention.total_seconds() / 86400
    data = {"retention_days": days, **sizes}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"retention: {days:g} days (BILLING_RETENTION), purged daily by the retention-daily schedule")
    oldest = sizes["oldest_batch"]
    print(
        f"  staged batches: {sizes['batches']:,} ({sizes['batch_rows']:,} rows, "
        f"{sizes['batch_rejections']:,} rejections, {sizes['batch_bytes'] / 1048576:,.1f} MiB), "
        f"oldest {oldest.astimezone(UTC):%Y-%m-%d %H:%M} UTC, {sizes['batches_expired']:,} past the retention"
        if oldest
        else "  staged batches: none"
    )
    oldest = sizes["oldest_webhook_event"]
    print(
        f"  webhook events: {sizes['webhook_events']:,} ({sizes['webhook_event_bytes'] / 1048576:,.1f} MiB), "
        f"oldest {oldest.astimezone(UTC):%Y-%m-%d %H:%M} UTC, {sizes['webhook_events_expired']:,} processed and past the retention"
        if oldest
        else "  webhook events: none"
    )
    return 0


def _limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 1000, got {value!r}")
    return int(value)


async def cmd_overview(args: argparse.Namespace, settings: Settings) -> int:
    """Orgs blocked and past due, the outbox, this month's resets, webhook and notification backlogs."""
    from billing.db.pool import database_pool
    from billing.read.overview import load_overview, overview_text

    async with database_pool(settings, max_size=2) as pool:
        view = await load_overview(pool)
    _print(view, args.json, overview_text(view))
    return 0


async def cmd_notifications(args: argparse.Namespace, settings: Settings) -> int:
    """An org's notifications to the product, newest first, with their delivery state."""
    from billing.adapters.notification_delivery import delivery_configured, org_notifications
    from billing.db.pool import database_pool
    from billing.db.sql import query
    from billing.read.overview import notifications_text

    async with database_pool(settings, max_size=2) as pool:
        async with pool.connection() as conn:
            exists = await (await conn.execute(query("org_exists"), {"org_id": args.org_id})).fetchone()
        if not exists or not exists["found"]:
            raise UserError(f"organization {args.org_id} does not exist")
        rows = await org_notifications(pool, args.org_id, args.limit)
    _print(rows, args.json, notifications_text(args.org_id, rows, delivery_configured(settings)))
    return 0


async def cmd_report_act(args: argparse.Namespace, settings: Settings) -> int:
    """Void, mark sent or send again named Stripe report rows of an org (recorded: who, when, why)."""
    from billing.db.pool import database_pool
    from billing.db.report_ops import act_on_rows

    async with database_pool(settings, max_size=2) as pool:
        acted = await act_on_rows(
            pool, args.org_id, args.identifiers, args.action, actor=args.by, reason=args.reason
        )
    done = {"void": "voided", "mark_sent": "marked sent", "resend": "queued to send again"}[args.action]
    lines = [
        f"{row.identifier} {done}" + (f" as {row.new_identifier}" if row.new_identifier else "") for row in acted
    ]
    _print({"action": args.action, "rows": [row.model_dump() for row in acted]}, args.json, "\n".join(lines))
    return 0


async def cmd_report_list(args: argparse.Namespace, settings: Settings) -> int:
    """List an org's Stripe report rows that are not settled (and the month's rows with --month)."""
    from billing.db.pool import database_pool
    from billing.db.sql import query
    from billing.domain.months import parse_month

    async with database_pool(settings, max_size=2) as pool:
        async with pool.connection() as conn:
            params = {"org_id": args.org_id, "month": parse_month(args.month) if args.month else None}
            rows = await (await conn.execute(query("report_rows_of_org"), params)).fetchall()
            actions = await (
                await conn.execute(query("report_actions_of_org"), {"org_id": args.org_id, "limit": 20})
            ).fetchall()
    if args.json:
        print(json.dumps({"rows": rows, "actions": actions}, indent=2, default=str))
        return 0
    for row in rows:
        late = " (sent late)" if row["sent_late"] else ""
        why = f": {row['status_reason']}" if row["status_reason"] else ""
        print(f"{row['identifier']}  {row['tag']}  {row['month']}  {row['quantity']:,}  {row['status']}{late}{why}")
    for action in actions:
        new = f" -> {action['new_identifier']}" if action["new_identifier"] else ""
        print(
            f"{iso(action['at'])} {action['actor']} {action['action']} {action['old_identifier']}{new}"
            f" ({action['from_status']}): {action['reason']}"
        )
    return 0


def _number(value: str) -> int | float:
    """A decimal from JSON as a plain number (an int when integral)."""
    return int(value) if float(value).is_integer() else float(value)


Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    """The ``billing`` argument parser with every subcommand."""
    parser = _Parser(prog="billing", description="Usage-based billing with Stripe, orchestrated by Temporal.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    dev = add("dev", cmd_dev, "run everything on embedded PostgreSQL and Temporal (data in .data/)")
    dev.add_argument("--data-dir", default=".data", help="where embedded state lives (default .data)")
    dev.add_argument(
        "--temporal-port", type=int, default=7233, help="embedded Temporal's port (default 7233)"
    )
    dev.add_argument(
        "--ui-port", type=int, default=8233, help="embedded Temporal Web UI's port (default 8233)"
    )
    dev.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the parent process ends (`make dev` uses it, so make never leaves it behind)",
    )
    add("worker", cmd_worker, "run a Temporal worker on BILLING_TASK_QUEUE")
    add("api", cmd_api, "serve the HTTP API on BILLING_HTTP_ADDR")
    migrate = add("migrate", cmd_migrate, "apply SQL migrations; register search attributes and schedules")
    migrate.add_argument(
        "--sql-only", action="store_true", help="apply migrations only, do not contact Temporal"
    )

    status = add("status", cmd_status, "show an org's plan, payment status, usage, reports and workflows")
    status.add_argument("org_id", type=_org_id, metavar="ORG_ID")
    status.add_argument("--month", type=_month, help="YYYY-MM (default: this UTC month)")
    status.add_argument("--json", action="store_true", help="print JSON")

    sync = add("sync", cmd_sync, "run a usage sync now (pull mode) and print what it applied")
    sync.add_argument("--json", action="store_true", help="print JSON")

    for name, handler, text in (
        (
            "block",
            cmd_block,
            "block an org's writes until `billing unblock` (recorded in org-billing/ORG_ID)",
        ),
        ("unblock", cmd_unblock, "lift an operator block and the org's open metered failures"),
    ):
        command = add(name, handler, text)
        command.add_argument("org_id", type=_org_id, metavar="ORG_ID")
        command.add_argument("--reason", type=_reason, required=True, help="why (kept in the org's state)")
        command.add_argument("--json", action="store_true", help="print the resulting state as JSON")

    reset = add("reset", cmd_reset, "reset an org's month once (says 'already done' the second time)")
    reset.add_argument("org_id", type=_org_id, metavar="ORG_ID")
    reset.add_argument("--month", type=_month, required=True, help="the month to open, YYYY-MM")
    reset.add_argument("--no-wait", action="store_true", help="do not wait for the reset to finish")
    reset.add_argument("--json", action="store_true", help="print JSON")

    reconcile = add(
        "reconcile",
        cmd_reconcile,
        "compare an org's sent Stripe reports with Stripe's meter summaries (exit 1 when they differ)",
    )
    reconcile.add_argument("org_id", type=_org_id, metavar="ORG_ID")
    reconcile.add_argument("--month", type=_month, required=True, help="the month to compare, YYYY-MM")
    reconcile.add_argument("--json", action="store_true", help="print JSON")

    system = add("system", cmd_system, "show what retention keeps: staged batches, webhook events, sizes")
    system.add_argument("--json", action="store_true", help="print JSON")

    overview = add(
        "overview",
        cmd_overview,
        "orgs blocked/past due, Stripe outbox, resets, webhook and notification backlogs",
    )
    overview.add_argument("--json", action="store_true", help="print JSON")

    notifications = add("notifications", cmd_notifications, "list an org's notifications and their delivery")
    notifications.add_argument("org_id", type=_org_id, metavar="ORG_ID")
    notifications.add_argument("--limit", type=_limit, default=50, help="how many, newest first (default 50)")
    notifications.add_argument("--json", action="store_true", help="print JSON")

    pending = add(
        "report-pending", cmd_report_pending, "start Stripe reports now for orgs with pending reports"
    )
    pending.add_argument("--org", dest="org_id", type=_org_id, metavar="ORG_ID", help="only this org")
    pending.add_argument("--json", action="store_true", help="print JSON")

    listing = add("report-list", cmd_report_list, "list an org's unsettled Stripe report rows and operator acts")
    listing.add_argument("org_id", type=_org_id, metavar="ORG_ID")
    listing.add_argument("--month", type=_month, help="also the month's settled rows, YYYY-MM")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for name, action, text in (
        ("report-void", "void", "write off pending, failed or uncertain report rows (never sent)"),
        ("report-mark-sent", "mark_sent", "settle uncertain rows Stripe counted (see billing reconcile)"),
        ("report-resend", "resend", "send failed or uncertain rows again under a new identifier"),
    ):
        command = add(name, cmd_report_act, text)
        command.set_defaults(action=action)
        command.add_argument("org_id", type=_org_id, metavar="ORG_ID")
        command.add_argument("identifiers", nargs="+", metavar="IDENTIFIER", help="the rows' identifiers")
        command.add_argument("--reason", type=_reason, required=True, help="why (recorded with the act)")
        command.add_argument(
            "--by", type=_reason, default=_os_user(), help="who acts (default: the OS user; recorded)"
        )
        command.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _uvloop_run(coro: Any) -> Any:
    """``asyncio.run`` on uvloop's event loop (pinned; the API's loop, see billing.cli.services)."""
    import uvloop

    return uvloop.run(coro)


def _os_user() -> str:
    """The default actor of an operator command: the OS user name."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status (no traceback for user errors)."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load()
        # The API serves the gateway's quota check on every write of the product: uvloop there.
        runner = _uvloop_run if args.handler is cmd_api else asyncio.run
        return runner(args.handler(args, settings))
    except UserError as exc:
        # One line, whatever the message's source put in it (Stripe's messages have several).
        print(f"billing: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `billing status ORG | head -3`: the reader has what it wanted; end quietly, like `cat`.
        _discard_stdout()
        return 0
    except Exception as exc:
        if os.environ.get("BILLING_DEBUG"):
            traceback.print_exc()
        print(
            f"billing: unexpected error: {type(exc).__name__}: {exc} (set BILLING_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return 1


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered for a closed pipe is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    code = run(argv)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
    sys.stderr.flush()
    # The Temporal SDK's native runtime can abort in interpreter finalisation; nothing is left to
    # flush or close here, so leave without running it.
    os._exit(code)
