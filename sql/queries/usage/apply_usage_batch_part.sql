-- One part (0 or 1) of a batch: the orgs usage_batch_part() gives it (sql/0017). The usage-sync
-- workflow applies the two parts in parallel transactions and adds their answers up.
SELECT rows_received, rows_applied, rows_rejected, rows_pending, overage_reports, orgs_applied, orgs_skipped
FROM apply_usage_batch(%(batch_id)s, %(part)s)
