-- Stripe reporting, claim / call / record (issue 10) and "every queued unit reaches Stripe" (issue 9).
--
-- States of an outbox row: pending (with a reason, e.g. waiting for a Stripe customer), sending
-- (claimed by one attempt under a lease), sent (sent_late when stamped at send time), uncertain (past
-- the horizon without a settled answer: never resent automatically), failed (refused for its own
-- fault), voided (an operator wrote it off). 'skipped' is gone: rows an older version skipped are owed
-- and go back to pending.
--
-- Lock order addition: a claim takes the org's advisory lock (class 21332, as before) and then the
-- org's outbox rows; it holds them for one short transaction, never across a Stripe call.

ALTER TABLE stripe_report_outbox DROP CONSTRAINT stripe_report_outbox_status_check;
UPDATE stripe_report_outbox
SET status = 'pending',
    status_reason = 'owed: was skipped at send time by an older version (' || coalesce(status_reason, '') || ')'
WHERE status = 'skipped';
ALTER TABLE stripe_report_outbox ADD CONSTRAINT stripe_report_outbox_status_check
    CHECK (status IN ('pending', 'sending', 'sent', 'uncertain', 'failed', 'voided'));

-- Defaults that suit rows inserted by apply_usage_batch / close_org_month / the storage job unchanged.
ALTER TABLE stripe_report_outbox
    ADD COLUMN attempt_id        uuid,          -- the claim that holds the row while 'sending'
    ADD COLUMN lease_until       timestamptz,   -- a claim not renewed by then is dead: the row is claimable
    ADD COLUMN first_attempt_at  timestamptz,   -- when Stripe may first have seen the identifier
    ADD COLUMN key_generation    integer NOT NULL DEFAULT 0,  -- bumped after a 5xx / no answer
    ADD COLUMN sent_timestamp    timestamptz,   -- the meter event timestamp actually sent
    ADD COLUMN sent_late         boolean NOT NULL DEFAULT false,
    ADD COLUMN previous_identifiers text[] NOT NULL DEFAULT '{}';

CREATE INDEX stripe_report_outbox_open_idx ON stripe_report_outbox (organization_id, id)
    WHERE status IN ('pending', 'sending');
DROP INDEX stripe_report_outbox_sent_idx;
CREATE INDEX stripe_report_outbox_sent_idx ON stripe_report_outbox (organization_id, sent_timestamp)
    WHERE status = 'sent';

-- Every operator act on a row: who, when, why (void, mark-sent, resend).
CREATE TABLE stripe_report_actions (
    id              bigserial PRIMARY KEY,
    outbox_id       bigint NOT NULL REFERENCES stripe_report_outbox (id),
    organization_id uuid NOT NULL,
    action          text NOT NULL CHECK (action IN ('void', 'mark_sent', 'resend')),
    actor           text NOT NULL CHECK (actor <> ''),
    reason          text NOT NULL CHECK (reason <> ''),
    from_status     text NOT NULL,
    old_identifier  text NOT NULL,
    new_identifier  text,
    at              timestamptz NOT NULL DEFAULT billing_now()
);
CREATE INDEX stripe_report_actions_org_idx ON stripe_report_actions (organization_id, at);

-- Stripe's asynchronous meter errors (thin v2 event notifications), by event id: a redelivery is one row.
CREATE TABLE stripe_meter_errors (
    event_id         text PRIMARY KEY,
    event_type       text NOT NULL,
    meter_id         text,
    code             text,
    message          text,
    error_count      integer NOT NULL DEFAULT 0,
    identifiers      text[] NOT NULL DEFAULT '{}',
    organization_id  uuid,
    received_at      timestamptz NOT NULL DEFAULT billing_now()
);
CREATE INDEX stripe_meter_errors_org_idx ON stripe_meter_errors (organization_id, received_at);

-- The Idempotency-Key of a row's current attempt: generation 0 keeps the key earlier versions used.
CREATE FUNCTION report_idempotency_key(p_identifier text, p_generation integer) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT 'billing-meter-event:' || p_identifier
           || CASE WHEN p_generation > 0 THEN ':' || p_generation ELSE '' END
$$;

-- Claim up to p_limit of one org's oldest claimable rows for one attempt, in one short transaction.
--  * (rows past the horizon were made 'uncertain' just before, by report_mark_uncertain, in the same
--    transaction, so they are never claimed);
--  * rows of an org without a Stripe customer stay pending, saying so;
--  * while another attempt holds a live lease on any row of the org, nothing is claimed (one sender
--    per org, oldest first): busy = true;
--  * a row whose lease expired is claimed again with the same identifier and a new key generation;
--  * the timestamp is decided at the first attempt: inside the row's own period while Stripe can still
--    invoice it (month end + p_grace, and within 35 days less a safety hour), else now (sent late).
CREATE FUNCTION report_claim(p_org uuid, p_limit integer, p_attempt uuid, p_lease interval,
                             p_grace interval)
RETURNS TABLE (busy boolean, id bigint, identifier text, idempotency_key text, quantity bigint,
               sent_timestamp timestamptz, sent_late boolean, stripe_event_name text,
               stripe_customer_id text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_now timestamptz := billing_now();
    v_customer text;
BEGIN
    PERFORM pg_advisory_xact_lock(21332, hashtext(p_org::text));

    IF EXISTS (SELECT 1 FROM stripe_report_outbox o
               WHERE o.organization_id = p_org AND o.status = 'sending' AND o.lease_until >= v_now
                 AND o.attempt_id <> p_attempt) THEN
        RETURN QUERY SELECT true, NULL::bigint, NULL::text, NULL::text, NULL::bigint,
                            NULL::timestamptz, NULL::boolean, NULL::text, NULL::text;
        RETURN;
    END IF;

    SELECT b.stripe_customer_id INTO v_customer
    FROM organization_billing b WHERE b.organization_id = p_org;
    IF v_customer IS NULL THEN
        UPDATE stripe_report_outbox o
        SET status = 'pending', attempt_id = NULL, lease_until = NULL,
            status_reason = 'waiting for a Stripe customer'
        WHERE o.organization_id = p_org AND o.status IN ('pending', 'sending')
          AND o.status_reason IS DISTINCT FROM 'waiting for a Stripe customer';
        RETURN;
    END IF;

    RETURN QUERY
    WITH picked AS (
        SELECT o.id FROM stripe_report_outbox o
        WHERE o.organization_id = p_org AND o.status IN ('pending', 'sending')
        ORDER BY o.id
        LIMIT p_limit
        FOR NO KEY UPDATE
    ), claimed AS (
        UPDATE stripe_report_outbox o
        SET status = 'sending', attempt_id = p_attempt, lease_until = v_now + p_lease,
            first_attempt_at = coalesce(o.first_attempt_at, v_now),
            key_generation = o.key_generation + CASE WHEN o.status = 'sending' THEN 1 ELSE 0 END,
            sent_timestamp = CASE
                WHEN o.first_attempt_at IS NOT NULL AND o.sent_timestamp IS NOT NULL THEN o.sent_timestamp
                WHEN v_now <= ((o.month + interval '1 month') AT TIME ZONE 'UTC') + p_grace
                     AND o.event_timestamp >= v_now - interval '35 days' + interval '1 hour'
                     AND o.event_timestamp <= v_now + interval '4 minutes'
                    THEN o.event_timestamp
                ELSE v_now END,
            sent_late = CASE
                WHEN o.first_attempt_at IS NOT NULL AND o.sent_timestamp IS NOT NULL THEN o.sent_late
                WHEN v_now <= ((o.month + interval '1 month') AT TIME ZONE 'UTC') + p_grace
                     AND o.event_timestamp >= v_now - interval '35 days' + interval '1 hour'
                     AND o.event_timestamp <= v_now + interval '4 minutes'
                    THEN false
                ELSE true END
        FROM picked
        WHERE o.id = picked.id
        RETURNING o.id, o.identifier, o.key_generation, o.quantity, o.sent_timestamp, o.sent_late, o.tag
    )
    SELECT false, c.id, c.identifier, report_idempotency_key(c.identifier, c.key_generation), c.quantity,
           c.sent_timestamp, c.sent_late, m.stripe_event_name, v_customer
    FROM claimed c JOIN meters m ON m.tag = c.tag
    ORDER BY c.id;
END
$$;

-- Give back the rows an attempt claimed but did not call Stripe for (it stopped at a retryable error):
-- they were never attempted by it, so a first attempt it set is forgotten too.
CREATE FUNCTION report_release(p_attempt uuid) RETURNS integer
LANGUAGE sql
AS $$
    WITH released AS (
        UPDATE stripe_report_outbox o
        SET status = 'pending', attempt_id = NULL, lease_until = NULL,
            first_attempt_at = CASE WHEN o.attempts = 0 THEN NULL ELSE o.first_attempt_at END,
            sent_timestamp = CASE WHEN o.attempts = 0 THEN NULL ELSE o.sent_timestamp END,
            sent_late = CASE WHEN o.attempts = 0 THEN false ELSE o.sent_late END
        WHERE o.attempt_id = p_attempt AND o.status = 'sending'
        RETURNING 1
    )
    SELECT count(*)::integer FROM released
$$;

-- Record one row's outcome in its own short transaction, only while the attempt still holds it.
--  outcome: 'sent' | 'failed' (row's fault) | 'retry' (pending again; p_rotate = true after a 5xx or no
--  answer, so the next attempt uses a new Idempotency-Key). It also renews the lease of the attempt's
--  other rows (the database side of the heartbeat), but only once half the lease has passed: renewing
--  every row on every record would cost a page of n rows n^2/2 row updates.
CREATE FUNCTION report_record_one(p_id bigint, p_attempt uuid, p_outcome text, p_reason text,
                                  p_response jsonb, p_rotate boolean, p_reported_by text, p_lease interval)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_now timestamptz := billing_now();
    v_org uuid;
    v_lease timestamptz;
BEGIN
    UPDATE stripe_report_outbox o
    SET status = CASE p_outcome WHEN 'retry' THEN 'pending' ELSE p_outcome END,
        status_reason = p_reason,
        stripe_response = coalesce(p_response, o.stripe_response),
        attempts = o.attempts + 1,
        attempt_id = NULL,
        lease_until = NULL,
        key_generation = o.key_generation + CASE WHEN p_rotate THEN 1 ELSE 0 END,
        sent_at = CASE WHEN p_outcome = 'sent' THEN v_now ELSE o.sent_at END,
        reported_by = CASE WHEN p_outcome = 'retry' THEN o.reported_by ELSE p_reported_by END
    FROM (SELECT lease_until FROM stripe_report_outbox WHERE id = p_id) AS old
    WHERE o.id = p_id AND o.attempt_id = p_attempt AND o.status = 'sending'
    RETURNING o.organization_id, old.lease_until INTO v_org, v_lease;
    IF v_org IS NULL THEN
        RETURN false;  -- the lease expired and another attempt took the row: its answer wins
    END IF;
    IF v_lease < v_now + p_lease / 2 THEN
        UPDATE stripe_report_outbox o SET lease_until = v_now + p_lease
        WHERE o.organization_id = v_org AND o.attempt_id = p_attempt AND o.status = 'sending';
    END IF;
    RETURN true;
END
$$;
