-- Rows the stager could not parse: rejected before they reach the apply.
INSERT INTO usage_batch_rejections (batch_id, idx, reason)
SELECT %(batch_id)s, idx, reason
FROM unnest(%(idx)s::integer[], %(reasons)s::text[]) AS given (idx, reason)
ON CONFLICT DO NOTHING
