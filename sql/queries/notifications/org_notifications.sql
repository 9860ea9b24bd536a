-- An org's notifications, newest first.
SELECT id, webhook_id, kind, payload, state, attempts, last_error, created_at, delivered_at
FROM notifications
WHERE organization_id = %(org_id)s::uuid
ORDER BY id DESC
LIMIT %(limit)s
