-- The org's most recent Stripe events that were not applied on purpose: metadata naming another org
-- than its customer's (mismatch), or livemode not matching STRIPE_API_KEY (ignored).
SELECT event_id, event_type, status, detail, event_created
FROM stripe_webhook_events
WHERE organization_id = %(org_id)s::uuid AND status IN ('mismatch', 'ignored')
ORDER BY event_created DESC, event_id
LIMIT 10
