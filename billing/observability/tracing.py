"""OpenTelemetry set-up: one trace from an HTTP request through Temporal to the Stripe call.

The API's middleware opens the request's server span (api/telemetry_middleware.py); Temporal's TracingInterceptor,
on the client and so on every worker built from it, carries the context in workflow and activity
headers (client start -> workflow -> activities -> workflows an activity starts -> their activities);
the psycopg and httpx instrumentations add a span per SQL statement and per outgoing HTTP request
(stripe-python's HTTPX transport: the Stripe calls). Spans are exported with OTLP (http/protobuf)
when the standard OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variable is set
(with the other standard OTEL_* variables: headers, service name, sampler).
"""

from __future__ import annotations

import os

from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from temporalio.contrib.opentelemetry import TracingInterceptor

from billing.observability.telemetry import tracer_provider

_configured = False


def otlp_requested(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Whether the standard OTEL_* variables ask for OTLP export of traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure_tracing() -> None:
    """Install the process's exporters and instrumentations once (worker, API, dev)."""
    global _configured
    if _configured:
        return
    _configured = True
    provider = tracer_provider()
    if otlp_requested():
        # Imported only when used: the exporter reads its endpoint and headers from OTEL_* itself.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    PsycopgInstrumentor().instrument(tracer_provider=provider, enable_commenter=False)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)


def tracing_interceptor() -> TracingInterceptor:
    """Temporal's tracing interceptor on this process's tracer provider (client and worker)."""
    return TracingInterceptor(tracer_provider().get_tracer("temporalio"))
