"""Bearer-token authentication of the usage and admin endpoints."""

from __future__ import annotations

import hmac

from opentelemetry import trace
from starlette.requests import Request

from api.error_responses import ApiError


def require_bearer(request: Request) -> None:
    """Raise 401 unless ``Authorization: Bearer <BILLING_API_TOKEN>``; compared in constant time.

    The outcome is recorded on the request's span as ``authenticated``.
    """
    expected: bytes = request.app.state.api_token.encode()
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), expected)
    trace.get_current_span().set_attribute("authenticated", ok)
    if not ok:
        raise ApiError(401, "missing or wrong bearer token in the Authorization header")
