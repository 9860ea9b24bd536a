-- Retention: the daily `retention-daily` schedule purges staged batches (usage_batches and their
-- usage_batch_* rows) and processed Stripe webhook events older than BILLING_RETENTION, in small
-- chunks. These indexes let each chunk find its oldest rows without scanning the tables.
CREATE INDEX usage_batches_staged_at_idx ON usage_batches (staged_at);
CREATE INDEX stripe_webhook_events_received_at_idx ON stripe_webhook_events (received_at);
