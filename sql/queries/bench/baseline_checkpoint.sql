-- Benchmark baseline, step 4 of 4: upsert the row's checkpoint.
INSERT INTO counter_checkpoints (project_id, tag, row_created_at, applied_total, row_updated_at, batch_id)
VALUES (%(project_id)s, %(tag)s, %(created_at)s, %(total)s, %(updated_at)s, %(batch_id)s)
ON CONFLICT (project_id, tag, row_created_at) DO UPDATE
    SET applied_total = EXCLUDED.applied_total, row_updated_at = EXCLUDED.row_updated_at,
        batch_id = EXCLUDED.batch_id, applied_at = billing_now()
