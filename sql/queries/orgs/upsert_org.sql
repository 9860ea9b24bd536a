-- Create or update an organization and its billing row; fields given as NULL keep their value
-- (plan defaults to free on creation).
WITH org AS (
    INSERT INTO organizations (id, name) VALUES (%(org_id)s::uuid, %(name)s)
    ON CONFLICT (id) DO UPDATE SET name = coalesce(EXCLUDED.name, organizations.name)
    RETURNING id
)
INSERT INTO organization_billing AS b (organization_id, plan, stripe_customer_id)
SELECT id, coalesce(%(plan)s, 'free'), %(stripe_customer_id)s FROM org
ON CONFLICT (organization_id) DO UPDATE
    SET plan = coalesce(%(plan)s, b.plan),
        stripe_customer_id = coalesce(%(stripe_customer_id)s, b.stripe_customer_id),
        updated_at = billing_now()
RETURNING organization_id
