SELECT rows_received, rows_applied, rows_rejected, rows_pending, overage_reports, orgs_applied, orgs_skipped
FROM apply_usage_batch(%(batch_id)s)
