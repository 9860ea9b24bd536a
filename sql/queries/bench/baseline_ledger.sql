-- Benchmark baseline, step 3 of 4: log the change.
INSERT INTO usage_ledger (batch_id, organization_id, project_id, tag, month, counter_rows, delta, value_after)
VALUES (%(batch_id)s, %(org_id)s, %(project_id)s, %(tag)s, %(month)s, 1, %(delta)s, %(value_after)s)
