-- The orgs a batch left out, first ones by id (the full list stays in the table).
SELECT organization_id::text AS org_id, to_char(month, 'YYYY-MM') AS month, reason
FROM usage_batch_skips
WHERE batch_id = %(batch_id)s
ORDER BY organization_id
LIMIT %(limit)s
