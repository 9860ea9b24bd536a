"""One trace from a push to Stripe: the HTTP request's span, the usage-sync workflow and its activities,
the stripe-report workflow an activity starts, its activity, the SQL statements and the Stripe call.
Tested with an in-memory exporter on a tracer provider swapped in for the test (restored after)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from api.app import create_app
from billing.db.pool import open_pool
from billing.observability.tracing import otlp_requested
from billing.orchestration.temporal import connect
from billing.testing.stripe_server import FakeStripe
from tests.conftest import API_TOKEN, running_worker
from tests.report_support import pro_org_with_customer, stripe_settings
from tests.usage_support import day_start, row, utc_now


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span of the test, in memory; the process's providers and instrumentations restored after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    PsycopgInstrumentor().instrument(tracer_provider=provider, enable_commenter=False)
    try:
        yield exporter
    finally:
        PsycopgInstrumentor().uninstrument()
        HTTPXClientInstrumentor().uninstrument()
        trace._TRACER_PROVIDER = previous
        provider.shutdown()


async def test_a_push_and_its_stripe_call_share_one_trace(
    database_url: str,
    pool: AsyncConnectionPool,
    client: Client,
    fake: FakeStripe,
    spans: InMemorySpanExporter,
) -> None:
    org, customer = await pro_org_with_customer(pool, fake)
    settings = stripe_settings(database_url, client, fake)
    traced = await connect(settings)  # the production client: the tracing interceptor on it and its workers
    traced_pool = await open_pool(database_url, max_size=5)  # opened after instrumenting psycopg
    try:
        async with (
            running_worker(settings, traced_pool, traced),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(settings, traced_pool, traced)),
                base_url="http://billing.test",
                headers={"Authorization": f"Bearer {API_TOKEN}"},
                timeout=60,
            ) as http,
        ):
            now = utc_now()  # updated_at now: a default one could lie in the future early in a day
            rows = [
                row(org.project_ids[0], "task.created", day_start(now), 50_100, updated_at=now)
            ]  # 100 over
            answer = await http.post("/v1/metrics", json={"metrics": rows})
            assert answer.status_code == 200, answer.text
            # A bound on the wait, not a timing assertion: a loaded machine may retry an activity.
            deadline = time.monotonic() + 120
            while not any(
                span.name == "RunActivity:send_stripe_reports" for span in spans.get_finished_spans()
            ):
                assert time.monotonic() < deadline, "\n".join(
                    span.name for span in spans.get_finished_spans()
                )
                await asyncio.sleep(0.1)
    finally:
        await traced_pool.close()
    assert fake.total(customer, "agent_tasks") == 100

    finished = spans.get_finished_spans()
    request = next(span for span in finished if span.name == "POST /v1/metrics")
    trace_id = request.context.trace_id
    in_trace = [span for span in finished if span.context.trace_id == trace_id]
    names = {span.name for span in in_trace}
    assert {
        "POST /v1/metrics",
        "StartWorkflow:UsageSyncWorkflow",
        "RunWorkflow:UsageSyncWorkflow",
        "RunActivity:apply_usage_batch",
        "RunActivity:start_pending_stripe_reports",
        "RunWorkflow:StripeReportWorkflow",
        "RunActivity:send_stripe_reports",
    } <= names, sorted(names)
    stripe_calls = [
        span
        for span in in_trace
        if span.kind == trace.SpanKind.CLIENT
        and "/v1/billing/meter_events"
        in str(span.attributes.get("url.full", span.attributes.get("http.url", "")))
    ]
    assert len(stripe_calls) == 1
    send = next(span for span in in_trace if span.name == "RunActivity:send_stripe_reports")
    assert stripe_calls[0].parent is not None and stripe_calls[0].parent.span_id == send.context.span_id
    sql = [span for span in in_trace if span.attributes.get("db.system") == "postgresql"]
    assert sql, "no SQL span in the trace"


def test_otlp_export_follows_the_standard_variables() -> None:
    assert not otlp_requested({})
    assert otlp_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert otlp_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not otlp_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}
    )


def test_with_an_otlp_endpoint_set_a_process_exports_spans_with_otlp() -> None:
    # In a process of its own: configuring tracing changes process-wide providers and instrumentation.
    probe = (
        "from billing.observability.tracing import configure_tracing; configure_tracing()\n"
        "from billing.observability.telemetry import tracer_provider\n"
        "print(sorted(type(p.span_exporter).__name__ for p in tracer_provider()._active_span_processor._span_processors))\n"
    )
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['OTLPSpanExporter']"
