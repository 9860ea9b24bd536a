-- What retention keeps: sizes and ages of the staged batches and the recorded webhook events, and how
-- much of each is already past the retention (purged by the next `retention-daily` run).
SELECT
    (SELECT count(*) FROM usage_batches)::bigint AS batches,
    (SELECT count(*) FROM usage_batch_rows)::bigint AS batch_rows,
    (SELECT count(*) FROM usage_batch_rejections)::bigint AS batch_rejections,
    (SELECT min(staged_at) FROM usage_batches) AS oldest_batch,
    (SELECT count(*) FROM usage_batches
      WHERE staged_at < billing_now() - make_interval(secs => %(retention_seconds)s))::bigint AS batches_expired,
    (SELECT count(*) FROM stripe_webhook_events)::bigint AS webhook_events,
    (SELECT min(received_at) FROM stripe_webhook_events) AS oldest_webhook_event,
    (SELECT count(*) FROM stripe_webhook_events
      WHERE received_at < billing_now() - make_interval(secs => %(retention_seconds)s)
        AND status NOT IN ('received', 'signalled'))::bigint AS webhook_events_expired,
    (pg_total_relation_size('usage_batch_rows') + pg_total_relation_size('usage_batches')
     + pg_total_relation_size('usage_batch_rejections'))::bigint AS batch_bytes,
    pg_total_relation_size('stripe_webhook_events')::bigint AS webhook_event_bytes
