-- One page of organizations that had usage in a month, in id order, after a cursor.
SELECT DISTINCT organization_id::text AS org_id
FROM org_usage
WHERE month = %(month)s::date
  AND (%(after_org_id)s::uuid IS NULL OR organization_id > %(after_org_id)s::uuid)
ORDER BY org_id
LIMIT %(page_size)s
