SELECT recompute_quota_flags(%(org_ids)s::uuid[], %(month)s::date) AS flags
