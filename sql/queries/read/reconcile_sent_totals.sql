-- What the outbox says was sent to Stripe for one org, per meter, for events stamped in a month (the
-- timestamp actually sent: a row sent late is stamped in the month it was sent in).
SELECT m.tag, m.stripe_event_name,
       coalesce(sum(o.quantity), 0)::bigint AS sent,
       count(o.id) AS events
FROM meters m
LEFT JOIN stripe_report_outbox o
       ON o.tag = m.tag
      AND o.organization_id = %(org_id)s::uuid
      AND o.status = 'sent'
      AND coalesce(o.sent_timestamp, o.event_timestamp) >= %(start)s
      AND coalesce(o.sent_timestamp, o.event_timestamp) < %(end)s
GROUP BY m.tag, m.stripe_event_name
ORDER BY m.stripe_event_name
