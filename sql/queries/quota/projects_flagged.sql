-- Which of the given projects have any meter flagged (over a free limit, or their org payment-blocked).
-- One statement answers every quota check that arrived while the previous one ran (api/quota.py).
SELECT DISTINCT project_id::text AS project_id
FROM quota_flags
WHERE project_id = ANY (%(project_ids)s::uuid[])
