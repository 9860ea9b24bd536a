-- The operator's one-screen overview (`billing overview`) and the worker's scrape-time gauges.
WITH clock AS (
    SELECT billing_now() AS now,
           date_trunc('month', billing_now() AT TIME ZONE 'UTC')::date AS month
), previous AS (
    SELECT DISTINCT u.organization_id
    FROM org_usage u, clock c
    WHERE u.month = (c.month - interval '1 month')::date
)
SELECT
    (SELECT to_char(month, 'YYYY-MM') FROM clock) AS month,
    (SELECT extract(epoch FROM c.now - (c.month::timestamp AT TIME ZONE 'UTC')) FROM clock c)::float8
        AS month_elapsed_seconds,
    (SELECT coalesce(jsonb_object_agg(payment_status, n), '{}')
     FROM (SELECT payment_status, count(*) AS n FROM organization_billing GROUP BY payment_status) s)
        AS orgs_by_payment_status,
    (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'org_id', organization_id, 'payment_status', payment_status,
                'reason', payment_status_reason) ORDER BY payment_status DESC, organization_id), '[]')
     FROM (SELECT organization_id, payment_status, payment_status_reason
           FROM organization_billing
           WHERE payment_status <> 'ok'
           ORDER BY payment_status DESC, organization_id
           LIMIT %(limit)s) s) AS orgs_not_ok,
    (SELECT coalesce(jsonb_object_agg(status, n), '{}')
     FROM (SELECT status, count(*) AS n FROM stripe_report_outbox GROUP BY status) s) AS reports_by_state,
    (SELECT extract(epoch FROM c.now - min(o.created_at)) FROM stripe_report_outbox o, clock c
     WHERE o.status = 'pending' GROUP BY c.now)::float8 AS oldest_pending_report_seconds,
    (SELECT count(*) FROM monthly_resets r, clock c WHERE r.month = c.month) AS resets_done,
    (SELECT count(*) FROM previous p, clock c
     WHERE NOT EXISTS (SELECT 1 FROM monthly_resets r
                       WHERE r.organization_id = p.organization_id AND r.month = c.month)) AS resets_missing,
    (SELECT count(*) FROM stripe_webhook_events WHERE status IN ('received', 'signalled')) AS webhook_backlog,
    (SELECT extract(epoch FROM c.now - min(e.received_at)) FROM stripe_webhook_events e, clock c
     WHERE e.status IN ('received', 'signalled') GROUP BY c.now)::float8 AS oldest_webhook_seconds,
    (SELECT coalesce(jsonb_object_agg(state, n), '{}')
     FROM (SELECT state, count(*) AS n FROM notifications GROUP BY state) s) AS notifications_by_state,
    (SELECT extract(epoch FROM c.now - min(n.created_at)) FROM notifications n, clock c
     WHERE n.state IN ('recorded', 'delivering') GROUP BY c.now)::float8 AS oldest_open_notification_seconds
