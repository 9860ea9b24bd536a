SELECT project_id::text AS project_id, tag, reason
FROM quota_flags
WHERE organization_id = %(org_id)s::uuid
ORDER BY project_id, tag
