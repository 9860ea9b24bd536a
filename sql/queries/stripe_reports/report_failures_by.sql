-- The newest refusals one activity recorded (for the workflow's current details and logs).
SELECT identifier, status_reason
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid AND reported_by = %(reported_by)s AND status = 'failed'
ORDER BY id DESC
LIMIT 5
