-- Pull batches that held rows back for orgs whose month has been opened since: a pull runs them
-- again (the apply then takes only the rows it held back), oldest first. The watermark has moved on
-- past them, so this is how their rows still arrive.
SELECT b.batch_id
FROM usage_batches b
WHERE b.source = 'pull' AND b.batch_id <> %(current)s
  AND b.batch_id IN (SELECT k.batch_id FROM usage_batch_skips k)
  AND EXISTS (SELECT 1 FROM usage_batch_skips k
              WHERE k.batch_id = b.batch_id
                AND k.month <= (SELECT max(r.month) FROM monthly_resets r
                                WHERE r.organization_id = k.organization_id))
ORDER BY b.staged_at, b.batch_id
LIMIT %(limit)s
