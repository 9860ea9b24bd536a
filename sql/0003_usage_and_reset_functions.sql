-- The two functions the original system introduced, generalised to months and meters-as-data, and
-- the set-based quota recomputation every path (sync, reset, payment state) shares.
--
-- Lock order, everywhere in this schema (keep it when adding statements, or concurrent writers
-- deadlock): monthly_resets -> counter_checkpoints -> project_usage -> org_usage -> organizations
-- -> organization_billing -> quota_flags -> stripe_report_outbox; within a table, by primary key.

-- Adds p_delta to one project's usage of one meter in one month, and to its organization's, in one
-- atomic upsert each. Raises for an unknown meter or project. Returns the project's new value.
CREATE FUNCTION increment_project_usage(p_project_id uuid, p_tag text, p_month date, p_delta bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_org   uuid;
    v_month date := date_trunc('month', p_month)::date;
    v_value bigint;
BEGIN
    PERFORM 1 FROM meters WHERE tag = p_tag;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown meter tag "%"', p_tag USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT organization_id INTO v_org FROM organization_projects WHERE project_id = p_project_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown project %', p_project_id USING ERRCODE = 'foreign_key_violation';
    END IF;

    INSERT INTO project_usage AS u (project_id, tag, month, organization_id, value)
    VALUES (p_project_id, p_tag, v_month, v_org, p_delta)
    ON CONFLICT (project_id, tag, month)
        DO UPDATE SET value = u.value + EXCLUDED.value, updated_at = now()
    RETURNING u.value INTO v_value;

    INSERT INTO org_usage AS o (organization_id, tag, month, value)
    VALUES (v_org, p_tag, v_month, p_delta)
    ON CONFLICT (organization_id, tag, month)
        DO UPDATE SET value = o.value + EXCLUDED.value, updated_at = now();

    RETURN v_value;
END
$$;

-- True for exactly one caller per organization and month, however many race: the primary key of
-- monthly_resets decides, and a loser waits for the winner's transaction before answering false.
CREATE FUNCTION try_claim_monthly_reset(p_org uuid, p_month date)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO monthly_resets (organization_id, month)
    VALUES (p_org, date_trunc('month', p_month)::date)
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;

-- Makes quota_flags say exactly what the organizations' plans, payment status and usage of p_month
-- say: a free plan over an included quantity flags that tag on every project of the org; a blocked
-- org flags every tag of every project. Returns how many flags the orgs have afterwards.
CREATE FUNCTION recompute_quota_flags(p_org_ids uuid[], p_month date)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_flagged integer;
BEGIN
    -- One recomputation per org at a time, locked in id order so concurrent callers never deadlock.
    PERFORM 1 FROM organizations WHERE id = ANY (p_org_ids) ORDER BY id FOR NO KEY UPDATE;

    -- Decide per org and meter first (a handful of rows per org, probed by primary key whatever the
    -- planner's statistics say), then fan out to the org's projects.
    WITH orgs AS (
        SELECT o.id AS organization_id, coalesce(b.plan, 'free') AS plan,
               coalesce(b.payment_status, 'ok') = 'blocked' AS blocked
        FROM organizations o
        LEFT JOIN organization_billing b ON b.organization_id = o.id
        WHERE o.id = ANY (p_org_ids)
    ), flagged AS (
        SELECT g.organization_id, m.tag,
               CASE WHEN g.blocked THEN 'payment_blocked' ELSE 'over_limit' END AS reason
        FROM orgs g
        CROSS JOIN meters m
        WHERE g.blocked
           OR (g.plan = 'free'
               AND (SELECT u.value FROM org_usage u
                    WHERE u.organization_id = g.organization_id AND u.tag = m.tag AND u.month = p_month)
                   > (SELECT l.included FROM plan_limits l WHERE l.plan = g.plan AND l.tag = m.tag))
    ), desired AS (
        SELECT p.project_id, f.tag, f.organization_id, f.reason
        FROM flagged f
        JOIN organization_projects p ON p.organization_id = f.organization_id
    ), cleared AS (
        DELETE FROM quota_flags f
        WHERE f.organization_id = ANY (p_org_ids)
          AND NOT EXISTS (SELECT 1 FROM desired d WHERE d.project_id = f.project_id AND d.tag = f.tag)
    )
    INSERT INTO quota_flags AS f (project_id, tag, organization_id, reason, month)
    SELECT project_id, tag, organization_id, reason, p_month FROM desired ORDER BY project_id, tag
    ON CONFLICT (project_id, tag) DO UPDATE
        SET reason = EXCLUDED.reason, organization_id = EXCLUDED.organization_id, month = EXCLUDED.month
        WHERE (f.reason, f.organization_id, f.month)
              IS DISTINCT FROM (EXCLUDED.reason, EXCLUDED.organization_id, EXCLUDED.month);

    SELECT count(*) INTO v_flagged FROM quota_flags WHERE organization_id = ANY (p_org_ids);
    RETURN v_flagged;
END
$$;

-- The monthly reset of one organization, in one transaction: claim (p_org, p_month) exactly once;
-- record the previous month's final usage; carry gauges (levels such as storage, which do not reset)
-- into the new month; recompute quota flags against the new month. Called again for a claimed month
-- it changes nothing and answers claimed = false. `flags` is how many quota flags the org has after.
CREATE FUNCTION close_org_month(p_org uuid, p_month date)
RETURNS TABLE (claimed boolean, closed_month date, tags_closed integer, flags integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_month date := date_trunc('month', p_month)::date;
BEGIN
    closed_month := (v_month - interval '1 month')::date;
    claimed := try_claim_monthly_reset(p_org, v_month);
    tags_closed := 0;
    IF claimed THEN
        INSERT INTO closed_month_usage (organization_id, month, tag, value)
        SELECT organization_id, month, tag, value
        FROM org_usage
        WHERE organization_id = p_org AND month = closed_month
        ORDER BY tag
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS tags_closed = ROW_COUNT;

        INSERT INTO project_usage (project_id, tag, month, organization_id, value)
        SELECT DISTINCT ON (pu.project_id, pu.tag) pu.project_id, pu.tag, v_month, pu.organization_id, pu.value
        FROM project_usage pu
        JOIN meters m ON m.tag = pu.tag AND NOT m.resets_monthly
        WHERE pu.organization_id = p_org AND pu.month < v_month
        ORDER BY pu.project_id, pu.tag, pu.month DESC
        ON CONFLICT DO NOTHING;

        INSERT INTO org_usage (organization_id, tag, month, value)
        SELECT DISTINCT ON (ou.tag) ou.organization_id, ou.tag, v_month, ou.value
        FROM org_usage ou
        JOIN meters m ON m.tag = ou.tag AND NOT m.resets_monthly
        WHERE ou.organization_id = p_org AND ou.month < v_month
        ORDER BY ou.tag, ou.month DESC
        ON CONFLICT DO NOTHING;
        -- Flags follow the newest open month only: closing an old month late must not flag the org
        -- by that month's usage.
        IF v_month = (SELECT max(month) FROM monthly_resets WHERE organization_id = p_org) THEN
            PERFORM recompute_quota_flags(ARRAY[p_org], v_month);
        END IF;
    END IF;
    SELECT count(*)::integer INTO flags FROM quota_flags WHERE organization_id = p_org;
    RETURN NEXT;
END
$$;
