-- Retention: delete at most %(chunk)s batches staged before the cutoff whose rows and rejections are
-- already gone, with their per-org bookkeeping (usage_batch_orgs, usage_batch_skips: a few rows per
-- batch). After this a push of the same body is staged again; its rows change nothing, because each
-- counter row's checkpoint (counter_checkpoints, never purged) holds the total already applied.
WITH doomed AS (
    SELECT b.batch_id
    FROM usage_batches b
    WHERE b.staged_at < billing_now() - make_interval(secs => %(retention_seconds)s)
      AND NOT EXISTS (SELECT 1 FROM usage_batch_rows r WHERE r.batch_id = b.batch_id)
      AND NOT EXISTS (SELECT 1 FROM usage_batch_rejections r WHERE r.batch_id = b.batch_id)
    ORDER BY b.staged_at
    LIMIT %(chunk)s
    FOR UPDATE SKIP LOCKED
), orgs AS (
    DELETE FROM usage_batch_orgs o USING doomed d WHERE o.batch_id = d.batch_id RETURNING 1
), skips AS (
    DELETE FROM usage_batch_skips s USING doomed d WHERE s.batch_id = d.batch_id RETURNING 1
), deleted AS (
    DELETE FROM usage_batches b USING doomed d WHERE b.batch_id = d.batch_id RETURNING 1
)
SELECT (SELECT count(*) FROM deleted)::int AS deleted,
       (SELECT count(*) FROM orgs)::int + (SELECT count(*) FROM skips)::int AS bookkeeping
