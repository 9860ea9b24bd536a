-- The org's queued Stripe overage by state, with quantities and the newest reason: every row of the
-- month asked for, and every row of any month not settled yet (pending, sending, uncertain, failed).
-- Rows waiting for a Stripe customer, and rows sent late (stamped at send time), are states of their own.
SELECT CASE
           WHEN status = 'pending' AND status_reason = 'waiting for a Stripe customer' THEN 'waiting_for_customer'
           WHEN status = 'sent' AND sent_late THEN 'sent_late'
           ELSE status
       END AS status,
       count(*) AS reports, sum(quantity)::bigint AS quantity,
       (array_agg(status_reason ORDER BY id DESC) FILTER (WHERE status_reason IS NOT NULL))[1] AS last_reason
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid
  AND (month = %(month)s::date OR status IN ('pending', 'sending', 'uncertain', 'failed'))
GROUP BY 1
ORDER BY 1
