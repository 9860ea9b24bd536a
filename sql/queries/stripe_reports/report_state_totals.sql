-- Every open or unsettled outbox row by state, for /metrics; rows waiting for a customer apart.
SELECT CASE WHEN status = 'pending' AND status_reason = 'waiting for a Stripe customer'
            THEN 'waiting_for_customer' ELSE status END AS state,
       count(*) AS reports, coalesce(sum(quantity), 0)::bigint AS quantity
FROM stripe_report_outbox
WHERE status IN ('pending', 'sending', 'uncertain', 'failed')
GROUP BY 1
