-- The org workflow's view of one org's billing, written in one transaction with its quota flags.
SELECT sync_org_billing(
    %(org_id)s::uuid, %(plan)s, %(pending_plan)s, %(period_end)s::timestamptz, %(subscription_id)s,
    %(payment_status)s, %(payment_status_reason)s, %(recompute)s, %(month)s::date
) AS flags
