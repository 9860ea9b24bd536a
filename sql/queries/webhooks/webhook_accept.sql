-- The webhook receiver's one round trip (issue 14): route a verified Stripe event and record it once,
-- by its id, in one statement. The receiver signals the org's workflow only when `route` is
-- 'received' and `recorded` is not 'applied'.
--
-- Routing, customer first (issue 11, finding 7):
--   ignored    the caller found the event's livemode is not STRIPE_API_KEY's (`ignored` says why);
--   mismatch   an org has the event's customer and the metadata names another org: recorded under
--              the customer's org, never applied;
--   received   the org that has the customer, else the existing org the metadata names;
--   lookup     nothing decided and nothing recorded: no org has the customer, there is no metadata
--              hint and the caller may ask Stripe for the subscription's metadata (it then runs this
--              again with that hint, not allowed to look up);
--   unmatched  no org at all (`unmatched_detail` says what was tried).
--
-- A redelivery keeps the row the first delivery left, except that an event first recorded unmatched
-- (or mismatch) and now routed is recorded anew as 'received' for its org. `recorded` is the row's
-- status as it now stands; NULL only when a concurrent delivery of the same event inserted it after
-- this statement's snapshot.
WITH facts AS (
    SELECT
        (SELECT organization_id FROM organization_billing
         WHERE stripe_customer_id = %(customer_id)s) AS customer_org,
        (SELECT id FROM organizations WHERE id = %(org_hint)s::uuid) AS hint_org,
        (SELECT stripe_customer_id FROM organization_billing
         WHERE organization_id = %(org_hint)s::uuid) AS hint_org_customer
), route AS (
    SELECT
        s.status,
        CASE s.status
            WHEN 'mismatch' THEN f.customer_org
            WHEN 'received' THEN coalesce(f.customer_org, f.hint_org)
        END AS org_id,
        CASE s.status
            WHEN 'ignored' THEN %(ignored)s::text
            WHEN 'unmatched' THEN %(unmatched_detail)s::text
            WHEN 'mismatch' THEN format(
                'metadata organization_id %%s names another org than %%s, whose Stripe customer %%s this is: not applied',
                %(org_hint)s::uuid, f.customer_org, %(customer_id)s::text)
        END AS detail,
        f.customer_org,
        f.hint_org_customer
    FROM facts f
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN %(ignored)s::text IS NOT NULL THEN 'ignored'
            WHEN f.customer_org IS NOT NULL AND %(org_hint)s::uuid <> f.customer_org THEN 'mismatch'
            WHEN f.customer_org IS NOT NULL THEN 'received'
            WHEN %(org_hint)s::uuid IS NULL AND %(may_look_up)s::boolean THEN 'lookup'
            WHEN f.hint_org IS NULL THEN 'unmatched'
            ELSE 'received'
        END AS status
    ) AS s
), inserted AS (
    INSERT INTO stripe_webhook_events AS e
        (event_id, event_type, organization_id, object_id, event_created, status, detail)
    SELECT %(event_id)s, %(event_type)s, r.org_id, %(object_id)s, to_timestamp(%(created)s), r.status, r.detail
    FROM route r
    WHERE r.status <> 'lookup'
    ON CONFLICT (event_id) DO UPDATE
        SET status = 'received', organization_id = coalesce(e.organization_id, EXCLUDED.organization_id)
        WHERE e.status IN ('unmatched', 'mismatch') AND EXCLUDED.status = 'received'
    RETURNING e.status
)
SELECT
    r.status AS route,
    r.org_id::text AS org_id,
    r.detail,
    r.customer_org::text AS customer_org,
    r.hint_org_customer,
    coalesce(
        (SELECT status FROM inserted),
        (SELECT status FROM stripe_webhook_events WHERE event_id = %(event_id)s)
    ) AS recorded
FROM route r
