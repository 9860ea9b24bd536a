-- One org's usage of a month for every meter, against its plan's included quantity.
SELECT m.tag, m.kind, m.limit_name,
       coalesce(u.value, 0) AS used,
       l.included,
       greatest(coalesce(u.value, 0) - coalesce(l.included, 0), 0) AS over_by,
       EXISTS (SELECT 1 FROM quota_flags f
               WHERE f.organization_id = %(org_id)s::uuid AND f.tag = m.tag) AS excess
FROM meters m
LEFT JOIN organization_billing b ON b.organization_id = %(org_id)s::uuid
LEFT JOIN plan_limits l ON l.plan = coalesce(b.plan, 'free') AND l.tag = m.tag
LEFT JOIN org_usage u ON u.organization_id = %(org_id)s::uuid AND u.tag = m.tag AND u.month = %(month)s::date
ORDER BY m.tag
