-- Whether any meter of the project is flagged (over a free limit, or its org payment-blocked).
SELECT EXISTS (SELECT 1 FROM quota_flags WHERE project_id = %(project_id)s::uuid) AS flagged
