-- A claim's first step, after report_lock_org and in the same transaction as report_claim: every row
-- first attempted longer than the horizon ago and still unsettled becomes 'uncertain'. Stripe keeps
-- an identifier for at least 24 hours only, so such a row is never resent automatically.
UPDATE stripe_report_outbox o
SET status = 'uncertain', attempt_id = NULL, lease_until = NULL,
    status_reason = 'not settled within ' || %(horizon)s::interval::text || ' of its first attempt ('
        || to_char(o.first_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI"Z"')
        || '): never resent automatically; check `billing reconcile`, then mark-sent or resend'
WHERE o.organization_id = %(org_id)s::uuid
  AND o.first_attempt_at < billing_now() - %(horizon)s::interval
  AND (o.status = 'pending' OR (o.status = 'sending' AND o.lease_until < billing_now()))
RETURNING o.identifier
