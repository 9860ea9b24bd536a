-- Claim the staging of a batch. No row back: it is staged already (or being staged by a concurrent
-- push, whose commit this waits for), so the caller stages nothing.
INSERT INTO usage_batches (batch_id, source, rows_received)
VALUES (%(batch_id)s, %(source)s, %(rows_received)s)
ON CONFLICT (batch_id) DO NOTHING
RETURNING batch_id
