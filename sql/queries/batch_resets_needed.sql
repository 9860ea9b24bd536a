-- The (org, month) pairs of a batch whose monthly reset must complete before the batch applies:
-- a month later than every month already opened for the org. Orgs never opened and without usage
-- are opened by the apply itself (nothing to close); orgs already applied for the batch need nothing.
WITH batch_months AS (
    SELECT DISTINCT p.organization_id, usage_month(m.kind, s.created_at, s.updated_at) AS month
    FROM usage_batch_rows s
    JOIN meters m ON m.tag = s.tag
    JOIN organization_projects p ON p.project_id = s.project_id
    WHERE s.batch_id = %(batch_id)s AND s.total >= 0 AND s.updated_at >= s.created_at
), orgs AS (
    SELECT b.organization_id, b.month,
           (SELECT max(r.month) FROM monthly_resets r WHERE r.organization_id = b.organization_id) AS opened
    FROM batch_months b
    WHERE NOT EXISTS (SELECT 1 FROM usage_batch_orgs a
                      WHERE a.batch_id = %(batch_id)s AND a.organization_id = b.organization_id)
)
SELECT o.organization_id::text AS org_id, to_char(o.month, 'YYYY-MM') AS month
FROM orgs o
WHERE CASE WHEN o.opened IS NOT NULL THEN o.month > o.opened
           ELSE EXISTS (SELECT 1 FROM org_usage u WHERE u.organization_id = o.organization_id)
      END
ORDER BY org_id, month
