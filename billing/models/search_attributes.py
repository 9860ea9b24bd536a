"""The search attributes the workflows set and the client side queries (keys crossing Temporal)."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

ORG_ID = SearchAttributeKey.for_keyword("BillingOrgId")
MONTH = SearchAttributeKey.for_keyword("BillingMonth")
PAYMENT_STATUS = SearchAttributeKey.for_keyword("PaymentStatus")
SEARCH_ATTRIBUTES = (ORG_ID, MONTH, PAYMENT_STATUS)
