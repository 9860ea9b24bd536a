-- The org workflow processed these events; detail says how (applied, duplicate, stale, ignored: ...).
UPDATE stripe_webhook_events AS e
SET status = 'applied', detail = d.detail, organization_id = coalesce(e.organization_id, %(org_id)s::uuid)
FROM unnest(%(event_ids)s::text[], %(details)s::text[]) AS d (event_id, detail)
WHERE e.event_id = d.event_id
  -- The first processing says what happened; a redelivery processed later is only a duplicate.
  AND e.status <> 'applied'
