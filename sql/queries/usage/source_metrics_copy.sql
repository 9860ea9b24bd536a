-- The core service's counter rows changed in the window, in the column order of usage_batch_rows,
-- numbered so that every staged row has an index. Runs on BILLING_METRICS_SOURCE_URL.
COPY (
    SELECT %(batch_id)s, row_number() OVER (ORDER BY updated_at, project_id, tag, created_at) - 1,
           project_id::text, tag::text, created_at, updated_at, increment::bigint
    FROM metrics
    WHERE updated_at > %(window_from)s::timestamptz AND updated_at <= %(window_to)s::timestamptz
      AND project_id IS NOT NULL AND tag IS NOT NULL AND created_at IS NOT NULL
      AND updated_at IS NOT NULL AND increment IS NOT NULL
) TO STDOUT
