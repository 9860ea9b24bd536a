-- Routing facts of a Stripe event: the org that has the event's customer, and the org its metadata
-- names (if it exists) with that org's recorded customer. The receiver decides (customer first).
SELECT
    (SELECT organization_id::text FROM organization_billing
     WHERE stripe_customer_id = %(customer_id)s) AS customer_org,
    (SELECT id::text FROM organizations WHERE id = %(org_hint)s::uuid) AS hint_org,
    (SELECT stripe_customer_id FROM organization_billing
     WHERE organization_id = %(org_hint)s::uuid) AS hint_org_customer
