"""Worker metrics: this project's counters, gauges read from PostgreSQL at scrape time, and the
Temporal SDK's runtime metrics, served together as Prometheus text on BILLING_WORKER_METRICS_ADDR.

Label values come from closed sets (the tuples below); anything else is counted as ``other``, so a
stray value can never create a time series per org or per error message.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from billing.db.sql import query
from billing.observability import telemetry

PAYMENT_STATUSES = ("ok", "past_due", "blocked")
# The outbox row states of sql/0008 (its status CHECK); 0008 turned the old "skipped" rows back to pending.
REPORT_STATES = ("pending", "sending", "sent", "uncertain", "failed", "voided")
NOTIFICATION_STATES = ("recorded", "delivering", "delivered", "failed", "not_configured")
USAGE_OUTCOMES = ("applied", "rejected", "held_back")
RESET_OUTCOMES = ("closed", "already_done", "refused")
DELIVERY_OUTCOMES = ("delivered", "refused", "unreachable", "gave_up")

USAGE_APPLY_ROWS = Counter(
    "billing_usage_apply_rows_total",
    "Counter rows by what an apply run of the usage sync did with them (applied, rejected, held_back)",
    ["outcome"],
)
MONTHLY_RESETS = Counter(
    "billing_monthly_resets_total",
    "Monthly reset runs by outcome (closed: the month was closed now; already_done; refused)",
    ["outcome"],
)
NOTIFICATION_DELIVERIES = Counter(
    "billing_notification_deliveries_total",
    "Notification delivery attempts by outcome (delivered, refused: non-2xx, unreachable, gave_up)",
    ["outcome"],
)
# The Stripe reporter's alerting counters. Defined in billing/observability/telemetry.py by the reporter when it has
# them; these stand in (same names and labels) so the alert rules' metrics exist either way.
STRIPE_CONFIG_REFUSALS: Counter = getattr(telemetry, "STRIPE_CONFIG_REFUSALS", None) or Counter(
    "billing_stripe_configuration_refusals_total",
    "Stripe refused a meter event for a configuration reason (the rows stay pending and are retried)",
    ["reason"],
)
STRIPE_METER_ERRORS: Counter = getattr(telemetry, "STRIPE_METER_ERRORS", None) or Counter(
    "billing_stripe_meter_errors_total", "Stripe meter error event notifications received", ["type"]
)

for _outcome in USAGE_OUTCOMES:
    USAGE_APPLY_ROWS.labels(_outcome)
for _outcome in RESET_OUTCOMES:
    MONTHLY_RESETS.labels(_outcome)
for _outcome in DELIVERY_OUTCOMES:
    NOTIFICATION_DELIVERIES.labels(_outcome)


def _by_label(
    name: str, doc: str, label: str, values: tuple[str, ...], counts: dict[str, Any]
) -> GaugeMetricFamily:
    """A gauge with one sample per value of a closed set (0 when absent), the rest summed as ``other``."""
    family = GaugeMetricFamily(name, doc, labels=[label])
    for value in values:
        family.add_metric([value], float(counts.get(value, 0)))
    other = sum(n for key, n in counts.items() if key not in values)
    if other:
        family.add_metric(["other"], float(other))
    return family


def _seconds(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value or 0.0))


def overview_families(row: dict[str, Any] | None) -> list[Metric]:
    """The scrape-time gauges from the overview query's row (None: the database did not answer)."""
    up = GaugeMetricFamily("billing_database_up", "1 when the worker could read PostgreSQL at this scrape")
    up.add_metric([], 1.0 if row is not None else 0.0)
    if row is None:
        return [up]
    return [
        up,
        _by_label(
            "billing_orgs",
            "Organizations by payment status",
            "payment_status",
            PAYMENT_STATUSES,
            row["orgs_by_payment_status"],
        ),
        _by_label(
            "billing_reports", "Stripe outbox rows by state", "state", REPORT_STATES, row["reports_by_state"]
        ),
        _seconds(
            "billing_reports_oldest_pending_seconds",
            "Age of the oldest pending Stripe report row (0 when none)",
            row["oldest_pending_report_seconds"],
        ),
        _seconds(
            "billing_month_elapsed_seconds",
            "Seconds since the current UTC month began (by the database clock)",
            row["month_elapsed_seconds"],
        ),
        GaugeMetricFamily(
            "billing_monthly_resets_done",
            "Orgs whose current month is opened",
            value=float(row["resets_done"]),
        ),
        GaugeMetricFamily(
            "billing_monthly_resets_missing",
            "Orgs with usage last month whose current month is not opened yet (reset not completed)",
            value=float(row["resets_missing"]),
        ),
        GaugeMetricFamily(
            "billing_webhook_events_backlog",
            "Verified Stripe events not yet applied by their org's workflow",
            value=float(row["webhook_backlog"]),
        ),
        _seconds(
            "billing_webhook_events_oldest_backlog_seconds",
            "Age of the oldest Stripe event not yet applied (0 when none)",
            row["oldest_webhook_seconds"],
        ),
        _by_label(
            "billing_notifications",
            "Notifications by delivery state",
            "state",
            NOTIFICATION_STATES,
            row["notifications_by_state"],
        ),
        _seconds(
            "billing_notifications_oldest_open_seconds",
            "Age of the oldest notification recorded or being delivered (0 when none)",
            row["oldest_open_notification_seconds"],
        ),
    ]


async def read_overview(pool: AsyncConnectionPool, limit: int = 20) -> dict[str, Any]:
    """One row of the overview query (see sql/queries/read/overview.sql)."""
    async with pool.connection() as conn:
        row = await (await conn.execute(query("overview"), {"limit": limit})).fetchone()
    assert row is not None
    return dict(row)


class _Static(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the SDK's internal exporter)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def temporal_runtime(sdk_metrics_addr: str) -> Runtime:
    """A Temporal runtime whose SDK metrics are served (Prometheus) at ``sdk_metrics_addr``.

    Clients connected with it, and their workers, publish the SDK's metrics (temporal_* names:
    polls, task latencies, activity and workflow outcomes). The worker's /metrics includes them.
    """
    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=sdk_metrics_addr)))


class WorkerMetrics:
    """The worker's /metrics: this process's registry, the database gauges, and the SDK's text."""

    def __init__(self, pool: AsyncConnectionPool, sdk_metrics_url: str | None) -> None:
        self.pool = pool
        self.sdk_metrics_url = sdk_metrics_url

    async def text(self) -> bytes:
        """The Prometheus exposition of one scrape."""
        try:
            row: dict[str, Any] | None = await read_overview(self.pool)
        except Exception:
            row = None  # billing_database_up 0 says so; the rest is still served
        scrape = CollectorRegistry()
        scrape.register(_Static(overview_families(row)))
        parts = [generate_latest(REGISTRY), generate_latest(scrape)]
        if self.sdk_metrics_url:
            try:
                async with httpx.AsyncClient(timeout=3.0) as http:
                    answer = await http.get(self.sdk_metrics_url)
                parts.append(answer.content)
            except httpx.HTTPError:
                pass
        return b"".join(part if part.endswith(b"\n") or not part else part + b"\n" for part in parts)

    def app(self) -> Starlette:
        """An ASGI app serving GET /metrics."""

        async def metrics(_: Request) -> Response:
            return Response(await self.text(), media_type=CONTENT_TYPE_LATEST)

        return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
