"""Prometheus metrics and OpenTelemetry tracing shared by the API and the worker."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "billing_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram("billing_http_request_seconds", "HTTP request latency", ["method", "route"])
USAGE_ROWS = Counter("billing_usage_rows_total", "Counter rows received", ["outcome"])
WEBHOOK_EVENTS = Counter(
    "billing_webhook_deliveries_total", "Stripe webhook deliveries by answer", ["status"]
)
QUOTA_CHECK_SOURCES = Counter(
    "billing_quota_checks_total",
    "Quota checks of quota-consuming writes, by where the answer came from: memory (the flag cache,"
    " fresh) or read (the database, while the cache is stale, reconnecting or the project changing)",
    ["source"],
)
STRIPE_REPORTS = Counter(
    "billing_stripe_reports_total", "Outbox rows settled by the Stripe reporter", ["outcome"]
)


class BillingTracerProvider(TracerProvider):
    """The SDK's tracer provider, which also tells whether a span would reach any span processor."""

    has_processors = False

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        """Add a processor (an exporter's, a test's); from now on spans are worth recording."""
        super().add_span_processor(span_processor)
        self.has_processors = True


def tracer_provider() -> TracerProvider:
    """The process's SDK tracer provider, installed on first use.

    Spans are exported only where an exporter is added (tests add an in-memory one; a deployment adds
    OTLP); without one they still carry attributes for in-process consumers and cost little.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = BillingTracerProvider()
        trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    """The tracer of the billing service."""
    return tracer_provider().get_tracer("billing")


STRIPE_REPORT_FAILURES = Counter(
    "billing_stripe_report_failures_total",
    "Outbox rows Stripe refused for their own fault (state failed), by Stripe's error code",
    ["reason"],
)
STRIPE_CONFIG_REFUSALS = Counter(
    "billing_stripe_configuration_refusals_total",
    "ALERT: Stripe refused a meter event for a configuration reason (no such or inactive meter, unknown "
    "event name, customer mapping); the rows stay pending and are retried",
    ["reason"],
)
STRIPE_METER_ERRORS = Counter(
    "billing_stripe_meter_errors_total", "Stripe meter error event notifications received", ["type"]
)
STRIPE_OUTBOX = Gauge(
    "billing_stripe_outbox_rows",
    "Outbox rows by state (pending, waiting_for_customer, sending, uncertain, failed), as of the last "
    "hourly storage-overage run or report page",
    ["state"],
)
STRIPE_OUTBOX_UNITS = Gauge(
    "billing_stripe_outbox_units",
    "Units of overage in the outbox by state (see billing_stripe_outbox_rows)",
    ["state"],
)
