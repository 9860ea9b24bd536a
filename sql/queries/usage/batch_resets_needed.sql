-- The (org, month) pairs of a batch whose monthly reset must complete before those rows apply: a
-- month later than every month already opened for the org. Only rows the apply would accept count
-- (usage_row_problem, the same rules and clock), so a rejected row -- one dated in a month that has
-- not begun, say -- never opens a month. Orgs never opened and without usage are opened by the apply
-- itself (nothing to close); months an earlier run of the batch applied need nothing.
WITH clock AS MATERIALIZED (
    SELECT billing_now() AS now  -- read once, not per row
), batch_months AS (
    -- Grouped first and filtered per group: a per-row filter this selective-looking would talk the
    -- planner into 100,000 index probes instead of hash joins.
    SELECT p.organization_id, usage_month(m.kind, s.created_at, s.updated_at) AS month
    FROM usage_batch_rows s
    CROSS JOIN clock
    JOIN meters m ON m.tag = s.tag
    JOIN organization_projects p ON p.project_id = s.project_id
    LEFT JOIN usage_batch_rejections j ON j.batch_id = s.batch_id AND j.idx = s.idx
    WHERE s.batch_id = %(batch_id)s
    GROUP BY 1, 2
    HAVING bool_or(j.idx IS NULL
                   AND usage_row_problem(s.tag, true, s.project_id, true, m.kind, s.created_at, s.updated_at,
                                         s.total, clock.now) IS NULL)
), orgs AS (
    SELECT b.organization_id, b.month,
           (SELECT max(r.month) FROM monthly_resets r WHERE r.organization_id = b.organization_id) AS opened
    FROM batch_months b
    WHERE NOT EXISTS (SELECT 1 FROM usage_batch_orgs a
                      WHERE a.batch_id = %(batch_id)s AND a.organization_id = b.organization_id
                        AND (a.applied_through IS NULL OR a.applied_through >= b.month))
)
SELECT o.organization_id::text AS org_id, to_char(o.month, 'YYYY-MM') AS month
FROM orgs o
WHERE CASE WHEN o.opened IS NOT NULL THEN o.month > o.opened
           ELSE EXISTS (SELECT 1 FROM org_usage u WHERE u.organization_id = o.organization_id)
      END
ORDER BY org_id, month
