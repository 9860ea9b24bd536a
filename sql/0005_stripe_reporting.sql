-- Stripe reporting: the outbox drain and the hourly storage overage.
--
-- Lock order addition (see 0003): a reporter takes the advisory lock of its org (class 0x5354 'ST',
-- key hashtext(org id)) before it locks any stripe_report_outbox row of that org, and holds both
-- across its Stripe calls. Nothing else takes that advisory lock, and the sync only INSERTs outbox
-- rows, so no cycle is possible.

-- One storage_gb_hour report per org and hour, whatever computes it: the identifier already makes a
-- second run of the same hour queue nothing; this says so in the schema too.
CREATE UNIQUE INDEX stripe_report_outbox_storage_hour_idx
    ON stripe_report_outbox (organization_id, report_hour)
    WHERE tag = 'storage.usage';

-- `billing reconcile`: sent rows of one org within a month's timestamps.
CREATE INDEX stripe_report_outbox_sent_idx
    ON stripe_report_outbox (organization_id, event_timestamp)
    WHERE status = 'sent';

-- Which activity settled a row (workflow id / run id / activity id): operators see which report sent
-- it, and a page retried after a partial commit still counts the rows its earlier attempts settled.
ALTER TABLE stripe_report_outbox ADD COLUMN reported_by text;
CREATE INDEX stripe_report_outbox_reported_by_idx ON stripe_report_outbox (reported_by)
    WHERE reported_by IS NOT NULL;
