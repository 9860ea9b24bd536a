"""The one place a Stripe client is made: stripe-python, pointed at STRIPE_API_BASE when set.

Retries belong to Temporal's activity retry policy alone, so the SDK's own retries are off; a call that
times out is retried by Temporal with the same identifier and Idempotency-Key, so Stripe counts it once.
"""

from __future__ import annotations

import stripe

from billing.core.config import Settings

# Long enough for Stripe's slow moments, short enough that a hung call is retried well inside the
# activity's start-to-close timeout.
STRIPE_TIMEOUT_SECONDS = 20.0


def is_refusal(exc: stripe.StripeError) -> bool:
    """A Stripe error that retrying will not fix: a 4xx other than 409 (key in use) and 429 (rate limit).

    (Meter events have a rule of their own: activities/stripe_reports.py also retries 401 and 403.)
    """
    status = exc.http_status
    return status is not None and 400 <= status < 500 and status not in (409, 429)


# The API's Stripe reads (a webhook's subscription lookup, a meter error's details) answer a request.
API_STRIPE_TIMEOUT_SECONDS = 10.0


def parsing_client(client: stripe.StripeClient | None) -> stripe.StripeClient:
    """``client``, or without STRIPE_API_KEY one that only verifies and parses event notifications."""
    return client or stripe.StripeClient("sk_unset_event_parser")


def make_stripe_client(
    settings: Settings, *, timeout: float = STRIPE_TIMEOUT_SECONDS
) -> stripe.StripeClient | None:
    """An async-capable StripeClient, or None when STRIPE_API_KEY is not set (reports stay pending)."""
    if settings.stripe_api_key is None:
        return None
    base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(
        settings.stripe_api_key.get_secret_value(),
        base_addresses=base,  # type: ignore[arg-type]
        max_network_retries=0,
        http_client=stripe.HTTPXClient(timeout=timeout),
    )
