-- Stripe reports of one org that are not sent yet, by status, with the newest reason.
SELECT status, count(*) AS reports, sum(quantity) AS quantity,
       (array_agg(status_reason ORDER BY id DESC) FILTER (WHERE status_reason IS NOT NULL))[1] AS last_reason
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid AND status IN ('pending', 'failed')
GROUP BY status
ORDER BY status
