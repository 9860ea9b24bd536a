SELECT id, webhook_id, organization_id::text AS org_id, kind, payload, state, attempts, created_at
FROM notifications
WHERE id = %(id)s
