-- Notifications not yet handed to Temporal (the given ids, or every one when ids is NULL), oldest first.
SELECT id, organization_id::text AS org_id
FROM notifications
WHERE state = 'recorded' AND (%(ids)s::bigint[] IS NULL OR id = ANY (%(ids)s::bigint[]))
ORDER BY id
LIMIT %(limit)s
