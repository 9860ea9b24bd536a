"""How the reporter reads Stripe's refusals (pure: no server)."""

from __future__ import annotations

import stripe

from activities.stripe_reports import _is_duplicate_identifier


def test_a_duplicate_identifier_is_recognised_by_code_or_by_stripes_documented_message() -> None:
    by_code = stripe.InvalidRequestError(
        "whatever", "identifier", code="resource_already_exists", http_status=400
    )
    by_message = stripe.InvalidRequestError(
        "An event already exists with identifier sync-abc.", "identifier", http_status=400
    )
    other = stripe.InvalidRequestError("No such customer: 'cus_gone'", "payload", http_status=400)
    server_error = stripe.APIError("An event already exists with identifier x.", http_status=500)
    assert _is_duplicate_identifier(by_code)
    assert _is_duplicate_identifier(by_message)
    assert not _is_duplicate_identifier(other)
    assert not _is_duplicate_identifier(server_error)
