-- Why one activity skipped rows, if it did.
SELECT status_reason
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid AND reported_by = %(reported_by)s AND status = 'skipped'
ORDER BY id DESC
LIMIT 1
