-- The org's uncertain rows (any month), for an operator to settle: mark-sent or resend.
SELECT identifier, tag, to_char(month, 'YYYY-MM') AS month, quantity, first_attempt_at,
       coalesce(sent_timestamp, event_timestamp) AS timestamp
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid AND status = 'uncertain'
ORDER BY id
LIMIT 1000
