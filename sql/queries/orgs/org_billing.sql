-- One org's billing row; plan free and payment ok when the dashboard created the org without one.
SELECT o.id::text AS org_id, o.name,
       coalesce(b.plan, 'free') AS plan,
       b.stripe_customer_id, b.stripe_subscription_id, b.pending_plan,
       coalesce(b.payment_status, 'ok') AS payment_status,
       b.payment_status_reason, b.period_end
FROM organizations o
LEFT JOIN organization_billing b ON b.organization_id = o.id
WHERE o.id = %(org_id)s::uuid
