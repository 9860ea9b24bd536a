-- Record a verified Stripe event once, by its id; answers the row as it now stands (a redelivery
-- finds the status the first delivery left).
WITH inserted AS (
    INSERT INTO stripe_webhook_events (event_id, event_type, organization_id, object_id, event_created, status, detail)
    VALUES (%(event_id)s, %(event_type)s, %(org_id)s::uuid, %(object_id)s, to_timestamp(%(created)s),
            %(status)s, %(detail)s)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING status, true AS first_delivery
)
SELECT status, first_delivery FROM inserted
UNION ALL
SELECT status, false AS first_delivery FROM stripe_webhook_events
WHERE event_id = %(event_id)s AND NOT EXISTS (SELECT 1 FROM inserted)
