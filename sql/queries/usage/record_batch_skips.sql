INSERT INTO usage_batch_skips (batch_id, organization_id, month, reason)
SELECT %(batch_id)s, org_id, month, reason
FROM unnest(%(org_ids)s::uuid[], %(months)s::date[], %(reasons)s::text[]) AS given (org_id, month, reason)
ORDER BY org_id
ON CONFLICT DO NOTHING
