-- Stripe meter errors of one org, newest first, and the newest ones no org could be matched to.
SELECT event_id, event_type, code, message, error_count, identifiers, received_at,
       organization_id IS NULL AS unmatched
FROM stripe_meter_errors
WHERE organization_id = %(org_id)s::uuid
   OR (organization_id IS NULL AND received_at > billing_now() - interval '35 days')
ORDER BY received_at DESC, event_id
LIMIT 20
