-- Record a page's outcomes: each row's new status (sent, failed, or still pending after a retryable
-- error), why, and Stripe's answer.
UPDATE stripe_report_outbox o
SET status = r.status,
    status_reason = r.reason,
    stripe_response = coalesce(r.response, o.stripe_response),
    attempts = o.attempts + 1,
    sent_at = CASE WHEN r.status = 'sent' THEN now() ELSE o.sent_at END,
    reported_by = CASE WHEN r.status = 'pending' THEN o.reported_by ELSE %(reported_by)s END
FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(reasons)s::text[], %(responses)s::jsonb[])
     AS r (id, status, reason, response)
WHERE o.id = r.id
