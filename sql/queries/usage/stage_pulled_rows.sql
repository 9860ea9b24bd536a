-- Rows pulled from the core service arrive in COPY's text format (see source_metrics_copy).
COPY usage_batch_rows (batch_id, idx, project_id, tag, created_at, updated_at, total) FROM STDIN
