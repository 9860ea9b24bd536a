-- The org workflow's view of one org's billing (only the columns it changed), written in one
-- transaction with its quota flags, and (issue 14) the webhook events whose effects this write
-- carries marked `applied` in the same statement (the UPDATE of webhook_mark_applied; no events: no
-- rows). One statement, so with autocommit it is one transaction and one round trip.
WITH marked AS (
    UPDATE stripe_webhook_events AS e
    SET status = 'applied', detail = d.detail, organization_id = coalesce(e.organization_id, %(org_id)s::uuid)
    FROM unnest(%(event_ids)s::text[], %(details)s::text[]) AS d (event_id, detail)
    WHERE e.event_id = d.event_id
      -- The first processing says what happened; a redelivery processed later is only a duplicate.
      AND e.status <> 'applied'
    RETURNING 1
)
SELECT sync_org_billing(
    %(org_id)s::uuid, %(plan)s, %(pending_plan)s, %(period_end)s::timestamptz, %(subscription_id)s,
    %(payment_status)s, %(payment_status_reason)s, %(columns)s::text[], %(recompute)s, %(month)s::date
) AS flags, (SELECT count(*) FROM marked)::integer AS marked
