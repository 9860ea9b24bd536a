-- The org workflow's view of one org's billing (only the columns it changed), written in one
-- transaction with its quota flags.
SELECT sync_org_billing(
    %(org_id)s::uuid, %(plan)s, %(pending_plan)s, %(period_end)s::timestamptz, %(subscription_id)s,
    %(payment_status)s, %(payment_status_reason)s, %(columns)s::text[], %(recompute)s, %(month)s::date
) AS flags
