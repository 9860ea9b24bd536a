-- Benchmark baseline (the original per-row algorithm), step 1 of 4: read the row's checkpoint.
SELECT applied_total FROM counter_checkpoints
WHERE project_id = %(project_id)s AND tag = %(tag)s AND row_created_at = %(created_at)s
