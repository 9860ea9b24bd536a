-- Webhook routing by customer first (issue 11, finding 7): two more outcomes of a verified event.
--
-- mismatch: its metadata organization_id names another org than the one its customer belongs to;
--           recorded under the customer's org, logged, shown in `billing status`, never applied.
-- ignored:  its livemode differs from the mode of STRIPE_API_KEY (a test event at a live deployment or
--           the reverse); answered 200 so Stripe stops, never applied. detail says why.
ALTER TABLE stripe_webhook_events DROP CONSTRAINT stripe_webhook_events_status_check;
ALTER TABLE stripe_webhook_events
    ADD CONSTRAINT stripe_webhook_events_status_check
    CHECK (status IN ('received', 'signalled', 'applied', 'unmatched', 'mismatch', 'ignored'));
