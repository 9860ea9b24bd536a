-- What the applies of a batch (or of one part, 0 or 1) have counted so far: rows applied and rows
-- rejected, counted as apply_usage_batch (sql/0017) answers them. Read in the apply's transaction just
-- before it, so that billing_usage_apply_rows_total counts what that apply did, not the running totals
-- its answer carries (a batch at a month's start is applied twice).
SELECT
    (SELECT coalesce(sum(a.rows_applied), 0)::bigint
     FROM usage_batch_orgs a
     WHERE a.batch_id = %(batch_id)s
       AND (%(part)s::integer IS NULL OR usage_batch_part(a.organization_id) = %(part)s::integer)
    ) AS rows_applied,
    (SELECT count(*)
     FROM usage_batch_rejections j
     LEFT JOIN usage_batch_rows s ON s.batch_id = j.batch_id AND s.idx = j.idx
     LEFT JOIN organization_projects p ON p.project_id = s.project_id
     WHERE j.batch_id = %(batch_id)s
       AND (%(part)s::integer IS NULL OR coalesce(usage_batch_part(p.organization_id), 0) = %(part)s::integer)
    ) AS rows_rejected
