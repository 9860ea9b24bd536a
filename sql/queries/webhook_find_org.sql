-- The organization a Stripe event belongs to: the organization_id from the subscription's metadata
-- if that org exists, else the org whose billing row has the event's customer.
SELECT coalesce(
    (SELECT id::text FROM organizations WHERE id = %(org_hint)s::uuid),
    (SELECT organization_id::text FROM organization_billing WHERE stripe_customer_id = %(customer_id)s)
) AS org_id
