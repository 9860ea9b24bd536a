-- The org-billing workflow's writes: the webhook event log's statuses and the one-transaction sync
-- of an organization's billing row with its quota flags.
--
-- Lock order (see 0003): organizations -> organization_billing -> quota_flags. sync_org_billing
-- takes the organizations row lock first, then writes organization_billing, then calls
-- recompute_quota_flags (which re-takes the same organizations lock, then writes quota_flags).

-- received: verified and recorded, not yet handed to Temporal; signalled: Temporal accepted the
-- signal; applied: the org workflow processed it (detail says how: applied, duplicate, stale,
-- ignored: ...); unmatched: no organization could be found for it.
ALTER TABLE stripe_webhook_events
    ADD CONSTRAINT stripe_webhook_events_status_check
    CHECK (status IN ('received', 'signalled', 'applied', 'unmatched'));

-- Writes the columns of an organization's billing row that the org workflow changed (p_columns names
-- them; values are the workflow's whole view, so a retried or repeated call changes nothing more) and,
-- when asked, recomputes its quota flags for p_month. Columns the workflow did not change keep what an
-- operator or the dashboard wrote meanwhile. A missing row is created from the whole view.
-- Returns how many quota flags the org has afterwards.
CREATE FUNCTION sync_org_billing(
    p_org uuid,
    p_plan text,
    p_pending_plan text,
    p_period_end timestamptz,
    p_subscription_id text,
    p_payment_status text,
    p_payment_status_reason text,
    p_columns text[],
    p_recompute boolean,
    p_month date
)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_flags integer;
BEGIN
    PERFORM 1 FROM organizations WHERE id = p_org FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown organization %', p_org USING ERRCODE = 'foreign_key_violation';
    END IF;

    INSERT INTO organization_billing AS b (
        organization_id, plan, pending_plan, period_end, stripe_subscription_id,
        payment_status, payment_status_reason)
    VALUES (p_org, p_plan, p_pending_plan, p_period_end, p_subscription_id,
            p_payment_status, p_payment_status_reason)
    ON CONFLICT (organization_id) DO UPDATE
        SET plan = CASE WHEN 'plan' = ANY (p_columns) THEN EXCLUDED.plan ELSE b.plan END,
            pending_plan = CASE WHEN 'pending_plan' = ANY (p_columns)
                                THEN EXCLUDED.pending_plan ELSE b.pending_plan END,
            period_end = CASE WHEN 'period_end' = ANY (p_columns) THEN EXCLUDED.period_end ELSE b.period_end END,
            stripe_subscription_id = CASE WHEN 'subscription_id' = ANY (p_columns)
                                          THEN EXCLUDED.stripe_subscription_id ELSE b.stripe_subscription_id END,
            payment_status = CASE WHEN 'payment_status' = ANY (p_columns)
                                  THEN EXCLUDED.payment_status ELSE b.payment_status END,
            payment_status_reason = CASE WHEN 'payment_status_reason' = ANY (p_columns)
                                         THEN EXCLUDED.payment_status_reason ELSE b.payment_status_reason END,
            updated_at = now()
        WHERE cardinality(p_columns) > 0;

    IF p_recompute THEN
        v_flags := recompute_quota_flags(ARRAY[p_org], p_month);
    ELSE
        SELECT count(*)::integer INTO v_flags FROM quota_flags WHERE organization_id = p_org;
    END IF;
    RETURN v_flags;
END
$$;
