-- The org learned its Stripe customer from an event routed to it by metadata (no org had that
-- customer): record it, but only when the org has none and no other org has it meanwhile. A recorded
-- customer is never re-pointed (the webhook receiver records such events as mismatches instead).
UPDATE organization_billing AS b
SET stripe_customer_id = %(customer_id)s, updated_at = billing_now()
WHERE b.organization_id = %(org_id)s::uuid
  AND b.stripe_customer_id IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM organization_billing o WHERE o.stripe_customer_id = %(customer_id)s
  )
