-- Core schema. The integration tables (organizations, organization_projects, organization_billing)
-- keep the original system's names and key columns because the product's dashboard writes them
-- directly; everything else belongs to the billing orchestrator.

CREATE TABLE organizations (
    id          uuid PRIMARY KEY,
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A project belongs to exactly one organization (project_id is unique on its own).
CREATE TABLE organization_projects (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id      uuid NOT NULL PRIMARY KEY,
    name            text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX organization_projects_org_idx ON organization_projects (organization_id);

CREATE TABLE plans (
    name text PRIMARY KEY CHECK (name IN ('free', 'pro', 'team'))
);

-- Meters are data, not code: adding a meter is an INSERT, not a release.
CREATE TABLE meters (
    tag                text PRIMARY KEY,
    stripe_event_name  text NOT NULL UNIQUE,
    kind               text NOT NULL CHECK (kind IN ('counter', 'gauge')),
    resets_monthly     boolean NOT NULL,
    limit_name         text NOT NULL UNIQUE
);

-- Included quantity per plan and meter. A paid plan is billed what lies above it; a free plan is
-- flagged `excess` above it.
CREATE TABLE plan_limits (
    plan      text NOT NULL REFERENCES plans (name),
    tag       text NOT NULL REFERENCES meters (tag),
    included  bigint NOT NULL CHECK (included >= 0),
    PRIMARY KEY (plan, tag)
);

-- A missing row means: plan free, payment ok (the dashboard may create organizations without one).
CREATE TABLE organization_billing (
    organization_id         uuid PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
    plan                    text NOT NULL DEFAULT 'free' REFERENCES plans (name),
    stripe_customer_id      text UNIQUE,
    stripe_subscription_id  text,
    pending_plan            text REFERENCES plans (name),
    payment_status          text NOT NULL DEFAULT 'ok' CHECK (payment_status IN ('ok', 'past_due', 'blocked')),
    payment_status_reason   text,
    period_end              timestamptz,
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- Usage of one project, meter and UTC month. Months are kept, never zeroed: the month is part of the key.
CREATE TABLE project_usage (
    project_id       uuid NOT NULL,
    tag              text NOT NULL REFERENCES meters (tag),
    month            date NOT NULL CHECK (extract(day FROM month) = 1),
    organization_id  uuid NOT NULL,
    value            bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, tag, month)
);

CREATE TABLE org_usage (
    organization_id  uuid NOT NULL,
    tag              text NOT NULL REFERENCES meters (tag),
    month            date NOT NULL CHECK (extract(day FROM month) = 1),
    value            bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, tag, month)
);
CREATE INDEX org_usage_month_idx ON org_usage (month, organization_id);

-- The last value applied for each counter row of the core service, keyed as the core service keys
-- its rows: (project, tag, created_at). Each daily row is diffed against itself, so the first counts
-- of a new day's row are never lost. `previous_total` and `previous_updated_at` hold the values the
-- last update replaced, so one upsert can both move a checkpoint and say what it moved from.
-- High-volume tables (a row per counter row): no foreign keys, whose per-row checks would double the
-- cost of a batch; their tags and projects come from joins with meters and organization_projects.
CREATE TABLE counter_checkpoints (
    project_id           uuid NOT NULL,
    tag                  text NOT NULL,
    row_created_at       timestamptz NOT NULL,
    applied_total        bigint NOT NULL CHECK (applied_total >= 0),
    row_updated_at       timestamptz NOT NULL,
    previous_total       bigint,
    previous_updated_at  timestamptz,
    batch_id             text NOT NULL,
    applied_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, tag, row_created_at)
);

-- Every applied change: what one batch changed of one project's usage of a meter and month, with the
-- number of counter rows it came from (the rows themselves stay staged under the batch id) and the
-- value after. The audit trail finance reconciles against: the deltas of an org, meter and month add
-- up to its org_usage. Append-only; indexed for the question finance asks (an org's month) and, by
-- BRIN, by time.
CREATE TABLE usage_ledger (
    batch_id         text NOT NULL,
    organization_id  uuid NOT NULL,
    project_id       uuid NOT NULL,
    tag              text NOT NULL,
    month            date NOT NULL,
    counter_rows     integer NOT NULL CHECK (counter_rows > 0),
    delta            bigint NOT NULL,
    value_after      bigint NOT NULL,
    applied_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_ledger_org_month_idx ON usage_ledger (organization_id, month);
CREATE INDEX usage_ledger_applied_at_idx ON usage_ledger USING brin (applied_at);

-- A row here means: writes for this project and tag are refused by the product's gateway.
CREATE TABLE quota_flags (
    project_id       uuid NOT NULL,
    tag              text NOT NULL REFERENCES meters (tag),
    organization_id  uuid NOT NULL,
    reason           text NOT NULL CHECK (reason IN ('over_limit', 'payment_blocked')),
    month            date NOT NULL,
    flagged_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, tag)
);
CREATE INDEX quota_flags_org_idx ON quota_flags (organization_id);

-- One row per organization and month whose reset was claimed. The primary key is the exactly-once
-- guarantee; Temporal's workflow ID only keeps a second workflow from starting.
CREATE TABLE monthly_resets (
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    month            date NOT NULL CHECK (extract(day FROM month) = 1),
    claimed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, month)
);

-- Final usage of a closed month, as it stood when the month was closed. Late growth still lands in
-- org_usage for that month (and in the ledger); this is the snapshot taken at close.
CREATE TABLE closed_month_usage (
    organization_id  uuid NOT NULL,
    month            date NOT NULL,
    tag              text NOT NULL REFERENCES meters (tag),
    value            bigint NOT NULL,
    closed_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, month, tag)
);

-- Overage waiting to be reported to Stripe: one row is one meter event. Rows are written in the same
-- transaction as the usage that caused them, so nothing is billed that was not applied and nothing
-- applied is left unbilled.
CREATE TABLE stripe_report_outbox (
    id               bigserial PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id),
    tag              text NOT NULL REFERENCES meters (tag),
    month            date NOT NULL,
    report_hour      timestamptz NOT NULL,
    event_timestamp  timestamptz NOT NULL,
    quantity         bigint NOT NULL CHECK (quantity > 0),
    source           text NOT NULL,
    identifier       text NOT NULL UNIQUE CHECK (length(identifier) <= 100),
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed', 'skipped')),
    status_reason    text,
    stripe_response  jsonb,
    attempts         integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz
);
CREATE INDEX stripe_report_outbox_pending_idx ON stripe_report_outbox (organization_id, id)
    WHERE status = 'pending';

-- Every verified Stripe webhook event, by Stripe's event id: a redelivery is recognised here.
CREATE TABLE stripe_webhook_events (
    event_id         text PRIMARY KEY,
    event_type       text NOT NULL,
    organization_id  uuid,
    object_id        text,
    event_created    timestamptz NOT NULL,
    status           text NOT NULL DEFAULT 'received',
    detail           text,
    received_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_webhook_events_org_idx ON stripe_webhook_events (organization_id, event_created);
