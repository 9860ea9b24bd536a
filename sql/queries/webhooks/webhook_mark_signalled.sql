-- Temporal accepted the signal. Only a 'received' row moves: the workflow may already have marked
-- it applied, and an unmatched (or mismatched) event that later matched is recorded anew by the receiver.
UPDATE stripe_webhook_events
SET status = 'signalled', organization_id = coalesce(organization_id, %(org_id)s::uuid)
WHERE event_id = %(event_id)s AND status IN ('received', 'unmatched', 'mismatch')
