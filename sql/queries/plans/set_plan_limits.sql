-- Set a plan's included quantities; returns the orgs on that plan, whose flags must be recomputed.
WITH changed AS (
    INSERT INTO plan_limits AS l (plan, tag, included)
    SELECT %(plan)s, tag, included
    FROM unnest(%(tags)s::text[], %(included)s::bigint[]) AS given (tag, included)
    ORDER BY tag
    ON CONFLICT (plan, tag) DO UPDATE SET included = EXCLUDED.included
    RETURNING tag
)
SELECT array_agg(o.id ORDER BY o.id) AS org_ids, (SELECT count(*) FROM changed) AS limits_set
FROM organizations o
LEFT JOIN organization_billing b ON b.organization_id = o.id
WHERE coalesce(b.plan, 'free') = %(plan)s
