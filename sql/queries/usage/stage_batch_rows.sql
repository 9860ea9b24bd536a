COPY usage_batch_rows (batch_id, idx, project_id, tag, created_at, updated_at, total) FROM STDIN (FORMAT BINARY)
