-- What one activity (over all its attempts) settled, and what the org still has open.
SELECT count(*) FILTER (WHERE status = 'sent' AND reported_by = %(reported_by)s) AS sent,
       count(*) FILTER (WHERE status = 'sent' AND reported_by = %(reported_by)s
                        AND stripe_response ->> 'deduplicated' = 'true') AS deduplicated,
       count(*) FILTER (WHERE status = 'failed' AND reported_by = %(reported_by)s) AS failed,
       count(*) FILTER (WHERE status IN ('pending', 'sending')) AS pending,
       count(*) FILTER (WHERE status = 'uncertain') AS uncertain,
       (array_agg(status_reason ORDER BY id) FILTER (
            WHERE status = 'pending' AND status_reason = 'waiting for a Stripe customer'))[1] AS waiting_reason
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid
  AND (status IN ('pending', 'sending', 'uncertain') OR reported_by = %(reported_by)s)
