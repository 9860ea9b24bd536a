-- A free org, or one without a Stripe customer, is never sent anything: its pending rows say why.
UPDATE stripe_report_outbox o
SET status = 'skipped',
    reported_by = %(reported_by)s,
    status_reason = CASE
        WHEN coalesce(b.plan, 'free') = 'free' THEN 'plan free: free plans are never billed'
        ELSE 'organization has no stripe_customer_id'
    END
FROM organizations org
LEFT JOIN organization_billing b ON b.organization_id = org.id
WHERE org.id = %(org_id)s::uuid
  AND o.organization_id = org.id
  AND o.status = 'pending'
  AND (coalesce(b.plan, 'free') = 'free' OR b.stripe_customer_id IS NULL)
RETURNING o.status_reason
