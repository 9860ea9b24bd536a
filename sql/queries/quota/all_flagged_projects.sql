-- Every project with any meter flagged: what an API process's flag cache starts from (api/quota_cache.py).
SELECT DISTINCT project_id::text AS project_id
FROM quota_flags
