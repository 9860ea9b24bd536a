-- Record one Stripe meter error notification (a redelivery changes nothing: inserted = false). The org is the org of the
-- first report row whose identifier (or an earlier identifier of it) Stripe's samples name.
INSERT INTO stripe_meter_errors
    (event_id, event_type, meter_id, code, message, error_count, identifiers, organization_id)
SELECT %(event_id)s, %(event_type)s, %(meter_id)s, %(code)s, %(message)s, %(error_count)s,
       %(identifiers)s::text[],
       (SELECT o.organization_id FROM stripe_report_outbox o
        WHERE o.identifier = ANY(%(identifiers)s::text[])
           OR o.previous_identifiers && %(identifiers)s::text[]
        ORDER BY o.id LIMIT 1)
ON CONFLICT (event_id) DO UPDATE SET event_id = EXCLUDED.event_id
RETURNING organization_id::text AS org_id, (xmax = 0) AS inserted
