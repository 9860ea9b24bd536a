-- An org's report rows for an operator: every row not settled, and the month's rows when given.
SELECT identifier, tag, to_char(month, 'YYYY-MM') AS month, quantity, status, sent_late, status_reason,
       first_attempt_at, attempts
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid
  AND (status IN ('pending', 'sending', 'uncertain', 'failed')
       OR (%(month)s::date IS NOT NULL AND month = %(month)s::date))
ORDER BY id
LIMIT 1000
