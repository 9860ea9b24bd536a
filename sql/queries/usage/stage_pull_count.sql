-- How many rows a pull staged under its batch.
UPDATE usage_batches
SET rows_received = (SELECT count(*) FROM usage_batch_rows WHERE batch_id = %(batch_id)s)
WHERE batch_id = %(batch_id)s
RETURNING rows_received
