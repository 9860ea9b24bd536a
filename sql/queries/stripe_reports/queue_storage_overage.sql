-- Storage catch-up: for every paid org, one storage_gb_hour row per hour over its plan's included
-- bytes, for every hour from the hour after the org's last queued storage hour up to %(hour)s (the
-- hour the run was scheduled for), at most 35 days back (Stripe's limit). A missed hour is billed at
-- the level the org held in that hour: the newest storage value of each of its projects applied
-- (usage_ledger) before the hour ended. An org without any storage ledger entry yet (a level written
-- straight into org_usage) is billed its current gauge for %(hour)s only. The quantity is the overage
-- in GiB, rounded up; the identifier is (org, hour) and a unique index allows one row per org and
-- hour, so running the same hours again queues nothing. Billability (a paid plan) is decided here.
WITH paid AS (
    SELECT b.organization_id, l.included,
           (SELECT max(q.report_hour) FROM stripe_report_outbox q
            WHERE q.organization_id = b.organization_id AND q.tag = 'storage.usage') AS last_hour,
           (SELECT min(g.applied_at) FROM usage_ledger g
            WHERE g.organization_id = b.organization_id AND g.tag = 'storage.usage') AS first_entry
    FROM organization_billing b
    JOIN plan_limits l ON l.plan = b.plan AND l.tag = 'storage.usage'
    WHERE b.plan <> 'free'
), hours AS (
    SELECT p.organization_id, p.included, p.first_entry, h.hour
    FROM paid p
    CROSS JOIN LATERAL generate_series(
        greatest(
            coalesce(p.last_hour + interval '1 hour', %(hour)s::timestamptz),
            %(hour)s::timestamptz - interval '35 days' + interval '1 hour',
            coalesce(date_trunc('hour', p.first_entry), %(hour)s::timestamptz)
        ),
        %(hour)s::timestamptz,
        interval '1 hour'
    ) AS h (hour)
), levels AS (
    SELECT h.organization_id, h.included, h.hour,
           CASE WHEN h.first_entry IS NOT NULL AND h.first_entry < h.hour + interval '1 hour' THEN (
               SELECT coalesce(sum(v.value_after), 0)
               FROM (SELECT DISTINCT ON (g.project_id) g.value_after
                     FROM usage_ledger g
                     WHERE g.organization_id = h.organization_id AND g.tag = 'storage.usage'
                       AND g.applied_at < h.hour + interval '1 hour'
                       AND g.month <= date_trunc('month', h.hour AT TIME ZONE 'UTC')::date
                     ORDER BY g.project_id, g.applied_at DESC, g.month DESC) v)
           WHEN h.hour = %(hour)s::timestamptz THEN (
               SELECT u.value FROM org_usage u
               WHERE u.organization_id = h.organization_id AND u.tag = 'storage.usage'
                 AND u.month <= date_trunc('month', h.hour AT TIME ZONE 'UTC')::date
               ORDER BY u.month DESC LIMIT 1)
           END AS value
    FROM hours h
)
INSERT INTO stripe_report_outbox
    (organization_id, tag, month, report_hour, event_timestamp, quantity, source, identifier)
SELECT lvl.organization_id, 'storage.usage', date_trunc('month', lvl.hour AT TIME ZONE 'UTC')::date,
       lvl.hour, lvl.hour,
       ceil((lvl.value - lvl.included)::numeric / 1073741824)::bigint,
       'storage:' || to_char(lvl.hour AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24'),
       'storage-' || lvl.organization_id || '-' || to_char(lvl.hour AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24')
FROM levels lvl
WHERE lvl.value > lvl.included
ORDER BY lvl.organization_id, lvl.hour
ON CONFLICT DO NOTHING
