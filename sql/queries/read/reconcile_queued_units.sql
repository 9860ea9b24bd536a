-- Every unit of overage queued for one org's month, by state: sent (inside the month), sent_late
-- (stamped at send time, in a later month), voided (by an operator), and the unsettled ones.
SELECT CASE
           WHEN status = 'pending' AND status_reason = 'waiting for a Stripe customer' THEN 'waiting_for_customer'
           WHEN status = 'sent' AND sent_late THEN 'sent_late'
           ELSE status
       END AS state,
       count(*) AS reports, coalesce(sum(quantity), 0)::bigint AS quantity
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid AND month = %(month)s::date
GROUP BY 1
ORDER BY 1
