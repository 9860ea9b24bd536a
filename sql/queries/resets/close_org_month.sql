SELECT claimed, closed_month, tags_closed, flags
FROM close_org_month(%(org_id)s::uuid, %(month)s::date)
