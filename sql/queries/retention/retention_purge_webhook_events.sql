-- Retention: delete at most %(chunk)s processed Stripe webhook events received before the cutoff.
-- An event still `received` or `signalled` (not yet applied by its org's workflow) is kept whatever
-- its age. Stripe redelivers for at most 3 days, far inside any retention allowed (7 days or more).
WITH doomed AS (
    SELECT event_id
    FROM stripe_webhook_events
    WHERE received_at < billing_now() - make_interval(secs => %(retention_seconds)s)
      AND status NOT IN ('received', 'signalled')
    ORDER BY received_at
    LIMIT %(chunk)s
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM stripe_webhook_events e USING doomed d WHERE e.event_id = d.event_id RETURNING 1
)
SELECT count(*)::int AS deleted FROM deleted
