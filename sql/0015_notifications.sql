-- Notifications to the product (issue 15): usage thresholds crossed, payment status and plan changes.
--
-- One row per thing to tell. `dedup_key` is the exactly-once guarantee: a usage threshold is keyed
-- by (org, meter, month, threshold), so however many syncs race, one row is inserted (ON CONFLICT DO
-- NOTHING) and so one delivery workflow `notify/{id}` runs. Billing-row changes get a fresh key per
-- change (the trigger below fires once per actual change, in the writer's transaction).
-- Lock order: notifications come last, after every table of the order in 0004 (README, "lock order");
-- threshold rows are inserted in dedup_key order.

-- Thresholds per plan, as percentages of each of the plan's included quantities.
CREATE TABLE plan_thresholds (
    plan     text NOT NULL REFERENCES plans (name),
    percent  integer NOT NULL CHECK (percent BETWEEN 1 AND 1000),
    PRIMARY KEY (plan, percent)
);
INSERT INTO plan_thresholds (plan, percent)
SELECT name, p FROM plans CROSS JOIN (VALUES (80), (100)) AS d (p);

-- state: recorded (not yet handed to Temporal), delivering (its notify/{id} workflow runs, retrying),
-- delivered, failed (given up after the delivery window), not_configured (BILLING_NOTIFY_URL or
-- BILLING_NOTIFY_SECRET unset when it was dispatched: recorded, never sent).
CREATE TABLE notifications (
    id               bigserial PRIMARY KEY,
    webhook_id       text NOT NULL UNIQUE DEFAULT ('msg_' || replace(gen_random_uuid()::text, '-', '')),
    organization_id  uuid NOT NULL,
    kind             text NOT NULL
                     CHECK (kind IN ('usage.threshold_crossed', 'payment.status_changed', 'plan.changed')),
    dedup_key        text NOT NULL UNIQUE,
    payload          jsonb NOT NULL,
    state            text NOT NULL DEFAULT 'recorded'
                     CHECK (state IN ('recorded', 'delivering', 'delivered', 'failed', 'not_configured')),
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT billing_now(),
    dispatched_at    timestamptz,
    delivered_at     timestamptz
);
CREATE INDEX notifications_org_idx ON notifications (organization_id, id DESC);
CREATE INDEX notifications_open_idx ON notifications (id) WHERE state IN ('recorded', 'delivering');

-- Payment status and plan changes, from whoever writes the billing row (the org-billing workflow,
-- the admin API, the product's dashboard): one notification per actual change, in the same
-- transaction. A row inserted as plan free and status ok changed nothing a reader did not assume.
CREATE FUNCTION notify_billing_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_old_status text := 'ok';
    v_old_plan   text := 'free';
BEGIN
    IF TG_OP = 'UPDATE' THEN
        v_old_status := OLD.payment_status;
        v_old_plan := OLD.plan;
    END IF;
    IF NEW.payment_status IS DISTINCT FROM v_old_status THEN
        INSERT INTO notifications (organization_id, kind, dedup_key, payload)
        VALUES (NEW.organization_id, 'payment.status_changed',
                format('payment/%s/%s', NEW.organization_id, gen_random_uuid()),
                jsonb_build_object('org_id', NEW.organization_id, 'from', v_old_status,
                                   'to', NEW.payment_status, 'reason', NEW.payment_status_reason,
                                   'at', billing_now()));
    END IF;
    IF NEW.plan IS DISTINCT FROM v_old_plan THEN
        INSERT INTO notifications (organization_id, kind, dedup_key, payload)
        VALUES (NEW.organization_id, 'plan.changed',
                format('plan/%s/%s', NEW.organization_id, gen_random_uuid()),
                jsonb_build_object('org_id', NEW.organization_id, 'from', v_old_plan, 'to', NEW.plan,
                                   'at', billing_now()));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER organization_billing_notify
AFTER INSERT OR UPDATE OF payment_status, plan ON organization_billing
FOR EACH ROW EXECUTE FUNCTION notify_billing_change();
