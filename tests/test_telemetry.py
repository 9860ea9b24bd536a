"""Operating it: the worker's /metrics (with the Temporal SDK's), the shipped alert rules against what
the processes publish, and `billing overview` on a database whose numbers are known exactly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import yaml
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from api.app import create_app
from billing.db.pool import open_pool
from billing.models.notify import DispatchInput, DispatchResult
from billing.observability.metrics import (
    NOTIFICATION_STATES,
    REPORT_STATES,
    WorkerMetrics,
    free_local_port,
    temporal_runtime,
)
from billing.orchestration.temporal import scheduled_jobs
from billing.testing.scratch import VENV_BIN, fresh_database
from tests.conftest import make_settings
from worker import build_worker
from workflows.notify import NotificationDispatchWorkflow

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
_PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
}


def published_names(text: str) -> set[str]:
    """Metric names in a Prometheus text exposition (samples and TYPE lines)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def rule_metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions, keywords, labels."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    tokens = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", bare)
    return {name for name, call in tokens if not call and name not in _PROMQL_WORDS}


def _rules() -> list[dict[str, object]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


async def test_every_metric_an_alert_rule_names_is_published(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    settings = make_settings(database_url, client)
    app = create_app(settings, pool, client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
        api_text = (await http.get("/metrics")).text
    worker_app = WorkerMetrics(pool, None).app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=worker_app), base_url="http://w") as http:
        worker_text = (await http.get("/metrics")).text
    published = published_names(api_text) | published_names(worker_text)

    rules = _rules()
    assert {rule["alert"] for rule in rules} >= {
        "BillingReportsUncertain",
        "BillingReportsFailed",
        "BillingReportsPendingTooLong",
        "BillingStripeConfigurationRefused",
        "BillingStripeMeterErrors",
        "BillingMonthlyResetsLate",
        "BillingWebhook5xx",
        "BillingNotificationDeliveriesFailing",
    }
    named: dict[str, set[str]] = {str(rule["alert"]): rule_metric_names(str(rule["expr"])) for rule in rules}
    assert all(named.values()), named
    missing = {alert: names - published for alert, names in named.items() if names - published}
    assert missing == {}
    # Label values the rules match on come from the closed sets the gauges publish.
    exprs = " ".join(str(rule["expr"]) for rule in rules)
    assert set(re.findall(r'billing_reports\{state="(\w+)"\}', exprs)) <= set(REPORT_STATES)
    assert set(re.findall(r'billing_notifications\{state="(\w+)"\}', exprs)) <= set(NOTIFICATION_STATES)
    assert 'billing_reports{state="uncertain"}' in worker_text


def test_the_rule_parser_finds_metric_names_and_nothing_else() -> None:
    assert rule_metric_names(
        'sum(increase(billing_x_total{status=~"5.."}[10m])) > 0 and max by (a) (billing_y) == 0'
    ) == {"billing_x_total", "billing_y"}


async def test_a_worker_serves_its_metrics_with_the_temporal_sdks(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    sdk_addr = f"127.0.0.1:{free_local_port()}"
    runtime = temporal_runtime(sdk_addr)
    own = await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        data_converter=pydantic_data_converter,
        runtime=runtime,
    )
    settings = make_settings(database_url, client)
    async with build_worker(settings, pool, own):
        result = await own.execute_workflow(
            NotificationDispatchWorkflow.run,
            DispatchInput(ids=[]),
            id=f"notifications-dispatch-test-{uuid.uuid4().hex[:8]}",
            task_queue=settings.task_queue,
            result_type=DispatchResult,
        )
        assert result == DispatchResult()
        app = WorkerMetrics(pool, f"http://{sdk_addr}/metrics").app()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as http:
            answer = await http.get("/metrics")
    assert answer.status_code == 200
    names = published_names(answer.text)
    assert {"temporal_workflow_completed", "temporal_activity_execution_latency"} <= names, sorted(names)
    assert {
        "billing_database_up",
        "billing_reports",
        "billing_reports_oldest_pending_seconds",
        "billing_monthly_resets_missing",
        "billing_notification_deliveries_total",
        "billing_usage_apply_rows_total",
    } <= names
    assert "billing_database_up 1.0" in answer.text


async def test_billing_worker_serves_metrics_on_its_address(database_url: str, client: Client) -> None:
    port = free_local_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "BILLING_TASK_QUEUE": f"test-{uuid.uuid4().hex[:10]}",
        "BILLING_WORKER_METRICS_ADDR": f"127.0.0.1:{port}",
    }
    process = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "billing"),
        "worker",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        text = ""
        async with httpx.AsyncClient(timeout=5) as http:
            while "temporal_" not in text:
                assert time.monotonic() < deadline, text[-2000:]
                assert process.returncode is None
                with contextlib.suppress(httpx.HTTPError):
                    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                await asyncio.sleep(0.2)
        names = published_names(text)
        assert "billing_database_up" in names and "billing_notifications" in names
        assert any(name.startswith("temporal_") for name in names)
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.communicate(), 60)
        # The worker put the schedules on the session's server for its task queue: take them away.
        for job in scheduled_jobs():
            with contextlib.suppress(Exception):
                await client.get_schedule_handle(job.schedule_id).delete()
    assert process.returncode == 0


async def test_billing_overview_counts_exactly(postgres_admin_url: str) -> None:
    with fresh_database(postgres_admin_url, prefix="billing_overview") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            dbname = conn.info.dbname
            conn.execute(f"ALTER DATABASE \"{dbname}\" SET billing.now = '2031-03-01T00:40:00Z'")
        pool = await open_pool(url, max_size=2)
        try:
            orgs = [str(uuid.uuid4()) for _ in range(4)]
            async with pool.connection() as conn:
                for org, status in zip(orgs, ["blocked", "past_due", "ok", "ok"], strict=True):
                    await conn.execute("INSERT INTO organizations (id) VALUES (%s)", [org])
                    await conn.execute(
                        "INSERT INTO organization_billing (organization_id, payment_status, payment_status_reason)"
                        " VALUES (%s, %s, %s)",
                        [org, status, None if status == "ok" else f"{status} invoice"],
                    )
                # Usage last month for orgs 2 and 3; only 3's March is opened.
                for org in orgs[2:]:
                    await conn.execute(
                        "INSERT INTO org_usage (organization_id, tag, month, value)"
                        " VALUES (%s, 'task.created', '2031-02-01', 5)",
                        [org],
                    )
                await conn.execute(
                    "INSERT INTO monthly_resets (organization_id, month) VALUES (%s, '2031-03-01')", [orgs[3]]
                )
                for identifier, status, created in [
                    ("a", "pending", "2031-02-28T22:40:00Z"),
                    ("b", "pending", "2031-03-01T00:10:00Z"),
                    ("c", "sent", "2031-02-28T20:00:00Z"),
                ]:
                    await conn.execute(
                        "INSERT INTO stripe_report_outbox (organization_id, tag, month, report_hour,"
                        " event_timestamp, quantity, source, identifier, status, created_at)"
                        " VALUES (%s, 'task.created', '2031-02-01', %s, %s, 1, 'test', %s, %s, %s)",
                        [orgs[0], created, created, identifier, status, created],
                    )
                await conn.execute(
                    "INSERT INTO stripe_webhook_events (event_id, event_type, event_created, received_at)"
                    " VALUES ('evt_1', 'invoice.paid', '2031-03-01T00:30:00Z', '2031-03-01T00:35:00Z')"
                )
        finally:
            await pool.close()
        env = {**os.environ, "DATABASE_URL": url}
        process = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "billing"), "overview", "--json", env=env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate()
        assert process.returncode == 0
        view = json.loads(out)
        text_process = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "billing"), "overview", env=env, stdout=asyncio.subprocess.PIPE
        )
        text, _ = await text_process.communicate()
    assert view == {
        "month": "2031-03",
        "orgs": {
            "blocked": 1,
            "past_due": 1,
            "not_ok": [
                {"org_id": orgs[1], "payment_status": "past_due", "reason": "past_due invoice"},
                {"org_id": orgs[0], "payment_status": "blocked", "reason": "blocked invoice"},
            ],
        },
        "stripe_outbox": {"by_state": {"pending": 2, "sent": 1}, "oldest_pending_seconds": 7200.0},
        "resets": {"done": 1, "missing": 1},
        "webhooks": {"backlog": 1, "oldest_seconds": 300.0},
        # The two non-ok orgs were written with their status: one notification each, recorded.
        "notifications": {"by_state": {"recorded": 2}, "oldest_open_seconds": 0.0},
    }
    lines = text.decode().splitlines()
    assert lines[0] == "month 2031-03 (UTC)"
    assert lines[1] == "orgs: 1 blocked, 1 past due"
    assert "stripe outbox: pending 2, sent 1; oldest pending: 2 h" in lines
    assert "monthly resets 2031-03: 1 done, 1 missing" in lines
    assert "stripe webhooks not applied yet: 1 (oldest: 5 min)" in lines
    assert "notifications: recorded 2; oldest undelivered: 0 min" in lines


async def test_the_report_state_gauge_publishes_exactly_the_outbox_states(
    database_url: str, pool: AsyncConnectionPool
) -> None:
    """`billing_reports{state}`'s closed label set is the outbox's status CHECK (sql/0008 removed
    `skipped`), and each state's sample is its exact row count."""
    from tests.factories import make_org
    from tests.report_support import queue_rows

    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint"
                " WHERE conname = 'stripe_report_outbox_status_check'"
            )
        ).fetchone()
    assert row is not None
    assert set(re.findall(r"'(\w+)'", row["def"])) == set(REPORT_STATES)
    assert "skipped" not in REPORT_STATES

    org = await make_org(pool, plan="pro")
    states = ["pending", "pending", "sending", "sent", "sent", "sent", "uncertain", "failed", "voided"]
    identifiers = await queue_rows(pool, org.id, [1] * len(states))
    async with pool.connection() as conn:
        for identifier, state in zip(identifiers, states, strict=True):
            await conn.execute(
                "UPDATE stripe_report_outbox SET status = %s WHERE identifier = %s", [state, identifier]
            )
    app = WorkerMetrics(pool, None).app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as http:
        text = (await http.get("/metrics")).text
    samples = {
        state: float(value)
        for state, value in re.findall(r'^billing_reports\{state="(\w+)"\} (\S+)$', text, re.M)
    }
    assert samples == {
        "pending": 2.0,
        "sending": 1.0,
        "sent": 3.0,
        "uncertain": 1.0,
        "failed": 1.0,
        "voided": 1.0,
    }
