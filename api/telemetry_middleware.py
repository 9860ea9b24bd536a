"""ASGI middleware: one OpenTelemetry server span and Prometheus counts per request."""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.observability.telemetry import HTTP_LATENCY, HTTP_REQUESTS, tracer

# Labels come from closed sets, so no request can add a time series: the standard methods (anything
# else is "other"), and the route templates (any path no route knows is "unmatched").
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


def method_label(method: str) -> str:
    """The method as a label: itself when standard, else ``other``."""
    return method if method in STANDARD_METHODS else "other"


def _route_template(scope: Scope) -> str:
    # Label by template, not path: one time series per endpoint, not per project id. A route that
    # matches the path but not the method (a 405) is still that route.
    app: Any = scope.get("app")
    partial = None
    for route in getattr(app, "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(route.path)
        if match == Match.PARTIAL and partial is None:
            partial = str(route.path)
    return partial or "unmatched"


class TelemetryMiddleware:
    """Wraps every HTTP request in a span named ``METHOD /route`` and counts it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route_template(scope)
        method = method_label(scope["method"])
        status = 500
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with tracer().start_as_current_span(f"{method} {route}", kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", method)
            span.set_attribute("http.route", route)
            try:
                await self.app(scope, receive, send_and_record)
            finally:
                span.set_attribute("http.response.status_code", status)
                HTTP_REQUESTS.labels(method, route, str(status)).inc()
                HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - started)
