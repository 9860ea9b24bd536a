-- What one activity (over all its attempts) settled, and what the org still has pending.
SELECT count(*) FILTER (WHERE status = 'sent' AND reported_by = %(reported_by)s) AS sent,
       count(*) FILTER (WHERE status = 'sent' AND reported_by = %(reported_by)s
                        AND stripe_response ->> 'deduplicated' = 'true') AS deduplicated,
       count(*) FILTER (WHERE status = 'failed' AND reported_by = %(reported_by)s) AS failed,
       count(*) FILTER (WHERE status = 'skipped' AND reported_by = %(reported_by)s) AS skipped,
       count(*) FILTER (WHERE status = 'pending') AS pending
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid
  AND (status = 'pending' OR reported_by = %(reported_by)s)
