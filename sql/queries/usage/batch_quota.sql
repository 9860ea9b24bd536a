-- Every meter of every known project of a batch, with whether the gateway must refuse it.
SELECT p.project_id::text AS project_id, m.tag, (f.project_id IS NOT NULL) AS excess
FROM (SELECT DISTINCT project_id FROM usage_batch_rows WHERE batch_id = %(batch_id)s) b
JOIN organization_projects p ON p.project_id = b.project_id
CROSS JOIN meters m
LEFT JOIN quota_flags f ON f.project_id = p.project_id AND f.tag = m.tag
ORDER BY p.project_id, m.tag
