-- Run in the usage activity's transaction right after apply_usage_batch: one notification per org,
-- meter, month and threshold its usage has reached, for the orgs of the batch in their open month.
-- The org_usage rows the apply changed are locked by this transaction, so the values read are the
-- newest; a concurrent batch's insert of the same key waits for this one and then does nothing.
-- part: the part of the batch just applied (its orgs only, sql/0017), or NULL for the whole batch.
WITH orgs AS (
    SELECT a.organization_id,
           (SELECT max(r.month) FROM monthly_resets r WHERE r.organization_id = a.organization_id) AS month
    FROM usage_batch_orgs a
    WHERE a.batch_id = %(batch_id)s
      AND (%(part)s::integer IS NULL OR usage_batch_part(a.organization_id) = %(part)s::integer)
), reached AS (
    SELECT o.organization_id, u.tag, u.month, t.percent, u.value, l.included, l.plan
    FROM orgs o
    JOIN org_usage u ON u.organization_id = o.organization_id AND u.month = o.month
    LEFT JOIN organization_billing b ON b.organization_id = o.organization_id
    JOIN plan_limits l ON l.plan = coalesce(b.plan, 'free') AND l.tag = u.tag AND l.included > 0
    JOIN plan_thresholds t ON t.plan = l.plan
    -- numeric: value * 100 must not overflow bigint.
    WHERE u.value::numeric * 100 >= l.included::numeric * t.percent
)
INSERT INTO notifications (organization_id, kind, dedup_key, payload)
SELECT organization_id, 'usage.threshold_crossed',
       format('usage/%%s/%%s/%%s/%%s', organization_id, tag, to_char(month, 'YYYY-MM'), percent),
       jsonb_build_object('org_id', organization_id, 'meter', tag, 'month', to_char(month, 'YYYY-MM'),
                          'threshold_percent', percent, 'plan', plan, 'included', included,
                          'usage', value, 'at', billing_now())
FROM reached
ORDER BY format('usage/%%s/%%s/%%s/%%s', organization_id, tag, to_char(month, 'YYYY-MM'), percent)
ON CONFLICT (dedup_key) DO NOTHING
RETURNING id
