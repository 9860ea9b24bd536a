SELECT to_char(month, 'YYYY-MM') AS month, claimed_at
FROM monthly_resets
WHERE organization_id = %(org_id)s::uuid
ORDER BY month DESC
LIMIT 3
