-- Retention: delete at most %(chunk)s rejection rows of batches staged before the cutoff.
WITH doomed AS (
    SELECT r.batch_id, r.idx
    FROM usage_batches b
    JOIN usage_batch_rejections r ON r.batch_id = b.batch_id
    WHERE b.staged_at < billing_now() - make_interval(secs => %(retention_seconds)s)
    LIMIT %(chunk)s
), deleted AS (
    DELETE FROM usage_batch_rejections r USING doomed d
    WHERE r.batch_id = d.batch_id AND r.idx = d.idx
    RETURNING 1
)
SELECT count(*)::int AS deleted FROM deleted
