-- One storage_gb_hour row per paid org whose storage level is above its plan's included bytes in
-- the hour %(hour)s. The level is the org's storage gauge of the newest month up to the hour's month
-- (the monthly reset carries it forward, but the hour may run before that reset). The quantity is the
-- overage in GiB, rounded up: one row is "this many GB held over the limit for one hour". The
-- identifier is (org, hour), so running the same hour again queues nothing.
INSERT INTO stripe_report_outbox
    (organization_id, tag, month, report_hour, event_timestamp, quantity, source, identifier)
SELECT lvl.organization_id, 'storage.usage', date_trunc('month', %(hour)s::timestamptz AT TIME ZONE 'UTC')::date,
       %(hour)s::timestamptz, %(hour)s::timestamptz,
       ceil((lvl.value - l.included)::numeric / 1073741824)::bigint,
       'storage:' || to_char(%(hour)s::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24'),
       'storage-' || lvl.organization_id || '-' || to_char(%(hour)s::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24')
FROM (
    SELECT DISTINCT ON (u.organization_id) u.organization_id, u.value
    FROM org_usage u
    WHERE u.tag = 'storage.usage'
      AND u.month <= date_trunc('month', %(hour)s::timestamptz AT TIME ZONE 'UTC')::date
    ORDER BY u.organization_id, u.month DESC
) lvl
JOIN organization_billing b ON b.organization_id = lvl.organization_id AND b.plan <> 'free'
JOIN plan_limits l ON l.plan = b.plan AND l.tag = 'storage.usage'
WHERE lvl.value > l.included
ORDER BY lvl.organization_id
ON CONFLICT DO NOTHING
