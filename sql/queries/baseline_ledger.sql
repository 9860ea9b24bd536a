-- Benchmark baseline, step 3 of 4: log the change.
INSERT INTO usage_ledger (batch_id, organization_id, project_id, tag, month, row_created_at, delta, value_after)
VALUES (%(batch_id)s, %(org_id)s, %(project_id)s, %(tag)s, %(month)s, %(created_at)s, %(delta)s, %(value_after)s)
