-- Usage sync: staged batches of counter rows and the one set-based function that applies a batch.
--
-- A batch (a push's content hash, or a pull's window) is staged here first, by COPY, and never
-- travels through Temporal. The usage_batch_* tables are private to their batch: only the apply of
-- that batch writes them, under a per-batch advisory lock taken before any other lock, so they sit
-- outside the lock order of 0003, which apply_usage_batch otherwise follows statement by statement:
-- monthly_resets -> counter_checkpoints -> project_usage -> org_usage -> organizations
-- -> organization_billing -> quota_flags -> stripe_report_outbox; within a table, by primary key
-- (counter checkpoints before gauge checkpoints: both in key order, in two statements).

-- One row per staged batch. A second stager of the same batch finds the row and stages nothing.
CREATE TABLE usage_batches (
    batch_id       text PRIMARY KEY,
    source         text NOT NULL CHECK (source IN ('push', 'pull')),
    rows_received  integer NOT NULL CHECK (rows_received >= 0),
    staged_at      timestamptz NOT NULL DEFAULT now()
);

-- The rows of a batch that passed parsing, as the core service sent them. No foreign key to
-- usage_batches: it would cost a trigger per row on a 100,000-row COPY, and only the stager writes here.
CREATE TABLE usage_batch_rows (
    batch_id    text NOT NULL,
    idx         integer NOT NULL,
    project_id  uuid NOT NULL,
    tag         text NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    total       bigint NOT NULL,
    PRIMARY KEY (batch_id, idx)
);

-- Why a row of a batch changed nothing: written by the stager (unparseable rows) and by the apply.
CREATE TABLE usage_batch_rejections (
    batch_id  text NOT NULL,
    idx       integer NOT NULL,
    reason    text NOT NULL,
    PRIMARY KEY (batch_id, idx)
);

-- Orgs of a batch whose month could not be opened (their monthly reset did not complete): their rows
-- are neither applied nor checkpointed, so a later sync applies them in full.
CREATE TABLE usage_batch_skips (
    batch_id         text NOT NULL,
    organization_id  uuid NOT NULL,
    month            date NOT NULL,
    reason           text NOT NULL,
    PRIMARY KEY (batch_id, organization_id)
);

-- Orgs whose rows of a batch are applied. Makes the apply idempotent per org: a retried or re-run
-- batch applies only the orgs still missing, never diffs the same rows twice.
CREATE TABLE usage_batch_orgs (
    batch_id         text NOT NULL,
    organization_id  uuid NOT NULL,
    rows_applied     integer NOT NULL,
    overage_reports  integer NOT NULL,
    applied_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, organization_id)
);

-- How far pull mode has read each source (updated_at of the core service's metrics table).
CREATE TABLE sync_watermarks (
    source      text PRIMARY KEY,
    watermark   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Checkpoints and usage rows are rewritten by every sync; leaving room on each page lets PostgreSQL
-- update them in place (HOT) instead of adding an index entry per changed row.
ALTER TABLE counter_checkpoints SET (fillfactor = 70);
ALTER TABLE project_usage SET (fillfactor = 70);
ALTER TABLE org_usage SET (fillfactor = 70);

-- The UTC month a row's usage belongs to: a counter's day (created_at); a gauge's observation time
-- (updated_at), because a gauge row is replaced on change and its created_at may be months old.
CREATE FUNCTION usage_month(p_kind text, p_created_at timestamptz, p_updated_at timestamptz)
RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_trunc('month', (CASE WHEN p_kind = 'gauge' THEN p_updated_at ELSE p_created_at END)
                               AT TIME ZONE 'UTC')::date
$$;

-- Applies the staged rows of one batch in the caller's transaction, set-based.
--
-- Counter rows are diffed against their own checkpoint (project, tag, created_at); a row older or
-- smaller than its checkpoint is rejected. Gauge rows set the project's level of their month. Deltas go
-- to project_usage and org_usage of the row's month and to usage_ledger; quota flags are recomputed
-- against each org's newest opened month; paid plans queue the counter overage that this batch added.
-- Orgs already applied for this batch, skipped for it, or whose month is not opened are left out.
CREATE FUNCTION apply_usage_batch(p_batch text)
RETURNS TABLE (rows_received integer, rows_applied bigint, rows_rejected bigint, rows_pending bigint,
               overage_reports bigint, orgs_applied bigint, orgs_skipped bigint)
LANGUAGE plpgsql
-- A 100,000-row batch sorts and hashes in memory rather than on disk.
SET work_mem = '64MB'
AS $$
DECLARE
    v_hour       timestamptz := date_trunc('hour', now(), 'UTC');
    v_this_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    v_month      date;
BEGIN
    -- One apply of a batch at a time: a retried attempt waits for a straggling one, then finds its
    -- orgs in usage_batch_orgs and leaves them alone. Taken before any row lock.
    PERFORM pg_advisory_xact_lock(hashtextextended('usage-batch:' || p_batch, 0));

    -- 1. Every staged row, with its meter and org; reasons for rows that can never apply.
    CREATE TEMP TABLE ub_in ON COMMIT DROP AS
    SELECT s.idx, s.project_id, s.tag, s.created_at, s.updated_at, s.total, m.kind, p.organization_id,
           CASE WHEN m.tag IS NULL THEN format('unknown tag "%s"', s.tag)
                WHEN p.project_id IS NULL THEN format('unknown project %s', s.project_id)
                WHEN s.total < 0 THEN 'increment must not be negative'
                WHEN s.updated_at < s.created_at THEN 'updated_at is before created_at'
                WHEN s.updated_at > now() + interval '5 minutes' THEN 'updated_at is in the future'
           END AS reason
    FROM usage_batch_rows s
    LEFT JOIN meters m ON m.tag = s.tag
    LEFT JOIN organization_projects p ON p.project_id = s.project_id
    WHERE s.batch_id = p_batch;

    INSERT INTO usage_batch_rejections (batch_id, idx, reason)
    SELECT p_batch, idx, reason FROM ub_in WHERE reason IS NOT NULL
    ON CONFLICT DO NOTHING;

    -- 2. The orgs this run applies: not yet applied for the batch, not skipped by the reset check.
    CREATE TEMP TABLE ub_orgs ON COMMIT DROP AS
    SELECT i.organization_id, max(usage_month(i.kind, i.created_at, i.updated_at)) AS max_month,
           NULL::date AS open_month
    FROM ub_in i
    WHERE i.reason IS NULL
      AND NOT EXISTS (SELECT 1 FROM usage_batch_orgs a
                      WHERE a.batch_id = p_batch AND a.organization_id = i.organization_id)
      AND NOT EXISTS (SELECT 1 FROM usage_batch_skips k
                      WHERE k.batch_id = p_batch AND k.organization_id = i.organization_id)
    GROUP BY i.organization_id;

    -- An org never seen before has no month to close: open this month for it here rather than run a
    -- reset workflow that would do nothing (lock order: monthly_resets first). Every such first batch
    -- claims the same (wall-clock) month, so concurrent first batches agree.
    INSERT INTO monthly_resets (organization_id, month)
    SELECT o.organization_id, v_this_month
    FROM ub_orgs o
    WHERE NOT EXISTS (SELECT 1 FROM monthly_resets r WHERE r.organization_id = o.organization_id)
      AND NOT EXISTS (SELECT 1 FROM org_usage u WHERE u.organization_id = o.organization_id)
    ORDER BY o.organization_id
    ON CONFLICT DO NOTHING;

    UPDATE ub_orgs o
    SET open_month = (SELECT max(r.month) FROM monthly_resets r WHERE r.organization_id = o.organization_id);

    -- Safety net behind the workflow's reset step: rows of a month not yet opened for their org are
    -- never applied (the reset must close the month before and carry gauges first).
    INSERT INTO usage_batch_skips (batch_id, organization_id, month, reason)
    SELECT p_batch, organization_id, max_month,
           format('monthly-reset/%s/%s has not completed', organization_id, to_char(max_month, 'YYYY-MM'))
    FROM ub_orgs
    WHERE open_month IS NULL OR open_month < max_month
    ON CONFLICT DO NOTHING;
    DELETE FROM ub_orgs WHERE open_month IS NULL OR open_month < max_month;

    -- 3. The newest version of each row of those orgs (a batch may carry a row several times).
    CREATE TEMP TABLE ub_rows ON COMMIT DROP AS
    SELECT DISTINCT ON (i.project_id, i.tag, i.created_at)
           i.idx, i.project_id, i.tag, i.created_at, i.updated_at, i.total, i.kind, i.organization_id,
           usage_month(i.kind, i.created_at, i.updated_at) AS month
    FROM ub_in i
    JOIN ub_orgs o ON o.organization_id = i.organization_id
    WHERE i.reason IS NULL
    ORDER BY i.project_id, i.tag, i.created_at, i.updated_at DESC, i.total DESC, i.idx DESC;

    -- 4. Move every checkpoint of the batch, in key order, in one upsert that also says what it moved
    -- from: a new row is inserted (nothing to diff against); an existing one is locked and, when the
    -- row grew, updated with its old values kept in previous_*. ON CONFLICT waits for a concurrent
    -- batch holding the same checkpoint and then sees its committed values, so the diff is always
    -- against the newest total, never a stale one. A row that went backwards, or is unchanged, is
    -- locked but not updated (the WHERE), and so not returned.
    CREATE TEMP TABLE ub_moved (
        project_id uuid, tag text, created_at timestamptz, updated_at timestamptz, total bigint,
        old_total bigint, kind text, organization_id uuid, month date
    ) ON COMMIT DROP;

    -- Counters first (a total may only grow), then gauges (a level may fall): two statements, so
    -- every batch locks all its counter checkpoints, in key order, before its gauge ones.
    WITH moved AS (
        INSERT INTO counter_checkpoints AS c
            (project_id, tag, row_created_at, applied_total, row_updated_at, batch_id)
        SELECT project_id, tag, created_at, total, updated_at, p_batch
        FROM ub_rows
        WHERE kind = 'counter'
        ORDER BY project_id, tag, created_at
        ON CONFLICT (project_id, tag, row_created_at) DO UPDATE
            SET previous_total = c.applied_total, previous_updated_at = c.row_updated_at,
                applied_total = EXCLUDED.applied_total, row_updated_at = EXCLUDED.row_updated_at,
                batch_id = EXCLUDED.batch_id, applied_at = now()
            WHERE EXCLUDED.row_updated_at >= c.row_updated_at
              AND EXCLUDED.applied_total >= c.applied_total
              AND (EXCLUDED.applied_total, EXCLUDED.row_updated_at) <> (c.applied_total, c.row_updated_at)
        RETURNING c.project_id, c.tag, c.row_created_at, c.row_updated_at, c.applied_total,
                  coalesce(c.previous_total, 0) AS old_total
    )
    INSERT INTO ub_moved
    SELECT v.project_id, v.tag, v.row_created_at, v.row_updated_at, v.applied_total, v.old_total, 'counter',
           p.organization_id, usage_month('counter', v.row_created_at, v.row_updated_at)
    FROM moved v
    JOIN organization_projects p ON p.project_id = v.project_id;

    WITH moved AS (
        INSERT INTO counter_checkpoints AS c
            (project_id, tag, row_created_at, applied_total, row_updated_at, batch_id)
        SELECT project_id, tag, created_at, total, updated_at, p_batch
        FROM ub_rows
        WHERE kind = 'gauge'
        ORDER BY project_id, tag, created_at
        ON CONFLICT (project_id, tag, row_created_at) DO UPDATE
            SET previous_total = c.applied_total, previous_updated_at = c.row_updated_at,
                applied_total = EXCLUDED.applied_total, row_updated_at = EXCLUDED.row_updated_at,
                batch_id = EXCLUDED.batch_id, applied_at = now()
            WHERE EXCLUDED.row_updated_at >= c.row_updated_at
              AND (EXCLUDED.applied_total, EXCLUDED.row_updated_at) <> (c.applied_total, c.row_updated_at)
        RETURNING c.project_id, c.tag, c.row_created_at, c.row_updated_at, c.applied_total,
                  coalesce(c.previous_total, 0) AS old_total
    )
    INSERT INTO ub_moved
    SELECT v.project_id, v.tag, v.row_created_at, v.row_updated_at, v.applied_total, v.old_total, 'gauge',
           p.organization_id, usage_month('gauge', v.row_created_at, v.row_updated_at)
    FROM moved v
    JOIN organization_projects p ON p.project_id = v.project_id;

    -- The rows the upsert left alone (none, usually): rejected when they went backwards, else seen
    -- before as they are. Their checkpoints are locked by us now, so what we read is what stays.
    IF (SELECT count(*) FROM ub_moved) < (SELECT count(*) FROM ub_rows) THEN
        INSERT INTO usage_batch_rejections (batch_id, idx, reason)
        SELECT p_batch, r.idx,
               CASE WHEN r.updated_at < c.row_updated_at
                        THEN format('went backwards: updated_at %s is older than the %s already applied',
                                    r.updated_at, c.row_updated_at)
                    ELSE format('went backwards: total %s is smaller than the %s already applied',
                                r.total, c.applied_total)
               END
        FROM ub_rows r
        JOIN counter_checkpoints c
          ON c.project_id = r.project_id AND c.tag = r.tag AND c.row_created_at = r.created_at
        WHERE NOT EXISTS (SELECT 1 FROM ub_moved v
                          WHERE v.project_id = r.project_id AND v.tag = r.tag AND v.created_at = r.created_at)
          AND (r.updated_at < c.row_updated_at OR (r.kind = 'counter' AND r.total < c.applied_total))
        ON CONFLICT DO NOTHING;
    END IF;

    -- 6. Per project, meter and month: counters add their growth; a gauge takes its newest level.
    CREATE TEMP TABLE ub_pu ON COMMIT DROP AS
    (SELECT project_id, tag, month, organization_id, false AS is_gauge,
            sum(total - old_total)::bigint AS amount, 0::bigint AS old_value, false AS is_new,
            count(*)::integer AS counter_rows
     FROM ub_moved
     WHERE kind = 'counter' AND total > old_total
     GROUP BY project_id, tag, month, organization_id)
    UNION ALL
    (SELECT DISTINCT ON (project_id, tag) project_id, tag, month, organization_id, true,
            total, 0::bigint, false, 1
     FROM ub_moved
     WHERE kind = 'gauge'
     ORDER BY project_id, tag, updated_at DESC, created_at DESC);

    -- Counters add their growth in one upsert, in key order; the value after comes back, and the value
    -- before is that minus the growth.
    WITH added AS (
        INSERT INTO project_usage AS u (project_id, tag, month, organization_id, value)
        SELECT project_id, tag, month, organization_id, amount
        FROM ub_pu
        WHERE NOT is_gauge
        ORDER BY project_id, tag, month
        ON CONFLICT (project_id, tag, month) DO UPDATE SET value = u.value + EXCLUDED.value, updated_at = now()
        RETURNING u.project_id, u.tag, u.month, u.value
    )
    UPDATE ub_pu t SET old_value = a.value - t.amount
    FROM added a
    WHERE NOT t.is_gauge AND t.project_id = a.project_id AND t.tag = a.tag AND t.month = a.month;

    -- Gauges (after the counters, in key order) take their new level: lock or create each row, read
    -- the level it replaces, then set it.
    WITH inserted AS (
        INSERT INTO project_usage AS u (project_id, tag, month, organization_id, value)
        SELECT project_id, tag, month, organization_id, amount
        FROM ub_pu
        WHERE is_gauge
        ORDER BY project_id, tag, month
        ON CONFLICT (project_id, tag, month) DO UPDATE SET value = u.value WHERE false
        RETURNING u.project_id, u.tag, u.month
    )
    UPDATE ub_pu t SET is_new = true
    FROM inserted n
    WHERE t.is_gauge AND t.project_id = n.project_id AND t.tag = n.tag AND t.month = n.month;

    UPDATE ub_pu t SET old_value = u.value
    FROM project_usage u
    WHERE t.is_gauge AND NOT t.is_new AND u.project_id = t.project_id AND u.tag = t.tag AND u.month = t.month;

    UPDATE project_usage u
    SET value = t.amount, updated_at = now()
    FROM ub_pu t
    WHERE t.is_gauge AND NOT t.is_new AND u.project_id = t.project_id AND u.tag = t.tag AND u.month = t.month
      AND u.value <> t.amount;

    -- 7. The ledger: what this batch changed of each project's usage of a meter and month, with how
    -- many counter rows it came from and the value after. (The rows themselves stay in
    -- usage_batch_rows under the batch id, so nothing of the detail is lost.)
    INSERT INTO usage_ledger
        (batch_id, organization_id, project_id, tag, month, counter_rows, delta, value_after)
    SELECT p_batch, organization_id, project_id, tag, month, counter_rows,
           CASE WHEN is_gauge THEN amount - old_value ELSE amount END,
           CASE WHEN is_gauge THEN amount ELSE old_value + amount END
    FROM ub_pu
    WHERE amount <> CASE WHEN is_gauge THEN old_value ELSE 0 END
    -- In the order of the org-and-month index: appending to it is far cheaper than scattering.
    ORDER BY organization_id, month;

    -- 8. Org usage moves by the sum of its projects' changes; the upsert returns the value after.
    CREATE TEMP TABLE ub_ou (organization_id uuid, tag text, month date, delta bigint, value_after bigint)
        ON COMMIT DROP;
    WITH changes AS (
        SELECT organization_id, tag, month,
               sum(CASE WHEN is_gauge THEN amount - old_value ELSE amount END)::bigint AS delta
        FROM ub_pu
        GROUP BY organization_id, tag, month
        HAVING sum(CASE WHEN is_gauge THEN amount - old_value ELSE amount END) <> 0
    ), upserted AS (
        INSERT INTO org_usage AS o (organization_id, tag, month, value)
        SELECT organization_id, tag, month, delta FROM changes
        ORDER BY organization_id, tag, month
        ON CONFLICT (organization_id, tag, month)
            DO UPDATE SET value = o.value + EXCLUDED.value, updated_at = now()
        RETURNING o.organization_id, o.tag, o.month, o.value
    )
    INSERT INTO ub_ou
    SELECT u.organization_id, u.tag, u.month, c.delta, u.value
    FROM upserted u
    JOIN changes c ON c.organization_id = u.organization_id AND c.tag = u.tag AND c.month = u.month;

    -- 9. Quota flags against each org's newest opened month: late growth of a closed month is kept
    -- in that month and never counts against the new one. Usage moves flags only where it crossed
    -- an included quantity of the org's plan in that month (every other cause of a flag change -- plan,
    -- payment status, limits, projects, the monthly reset -- recomputes flags itself), so only those
    -- orgs, and blocked ones, are recomputed. They are locked first, in id order, so the per-month calls below cannot
    -- interleave with another batch's in a different order.
    CREATE TEMP TABLE ub_flag_orgs ON COMMIT DROP AS
    SELECT DISTINCT o.organization_id, g.open_month
    FROM ub_ou o
    JOIN ub_orgs g ON g.organization_id = o.organization_id AND g.open_month = o.month
    LEFT JOIN organization_billing b ON b.organization_id = o.organization_id
    JOIN plan_limits l ON l.plan = coalesce(b.plan, 'free') AND l.tag = o.tag
    WHERE (o.value_after > l.included) <> (o.value_after - o.delta > l.included)
    UNION
    -- Payment blocks flag every project whatever the usage; the dashboard may write the status
    -- straight into organization_billing, so blocked orgs (and ones still carrying block flags)
    -- are always recomputed. They are few.
    SELECT g.organization_id, g.open_month
    FROM ub_orgs g
    LEFT JOIN organization_billing b ON b.organization_id = g.organization_id
    WHERE b.payment_status = 'blocked'
       OR EXISTS (SELECT 1 FROM quota_flags f
                  WHERE f.organization_id = g.organization_id AND f.reason = 'payment_blocked');

    PERFORM 1 FROM organizations
    WHERE id IN (SELECT organization_id FROM ub_flag_orgs)
    ORDER BY id
    FOR NO KEY UPDATE;
    FOR v_month IN SELECT DISTINCT open_month FROM ub_flag_orgs ORDER BY 1 LOOP
        PERFORM recompute_quota_flags(
            ARRAY(SELECT organization_id FROM ub_flag_orgs WHERE open_month = v_month ORDER BY 1), v_month);
    END LOOP;

    -- 10. Paid plans: queue the counter overage this batch added (overage after minus overage before),
    -- stamped inside the usage's month. Storage overage is reported hourly elsewhere.
    CREATE TEMP TABLE ub_outbox (organization_id uuid, reports bigint) ON COMMIT DROP;
    WITH queued AS (
        INSERT INTO stripe_report_outbox
            (organization_id, tag, month, report_hour, event_timestamp, quantity, source, identifier)
        SELECT o.organization_id, o.tag, o.month, v_hour,
               least(now(), ((o.month + interval '1 month') AT TIME ZONE 'UTC') - interval '1 second'),
               greatest(o.value_after - l.included, 0) - greatest(o.value_after - o.delta - l.included, 0),
               'sync:' || p_batch,
               'sync-' || encode(sha256(convert_to(
                   concat_ws('|', p_batch, o.organization_id, o.tag, to_char(o.month, 'YYYY-MM')), 'UTF8')), 'hex')
        FROM ub_ou o
        JOIN meters m ON m.tag = o.tag AND m.kind = 'counter'
        JOIN organization_billing b ON b.organization_id = o.organization_id AND b.plan IN ('pro', 'team')
        JOIN plan_limits l ON l.plan = b.plan AND l.tag = o.tag
        WHERE greatest(o.value_after - l.included, 0) - greatest(o.value_after - o.delta - l.included, 0) > 0
        ORDER BY o.organization_id, o.tag, o.month
        ON CONFLICT (identifier) DO NOTHING
        RETURNING organization_id
    )
    INSERT INTO ub_outbox SELECT organization_id, count(*) FROM queued GROUP BY organization_id;

    -- 11. Mark the orgs applied, with what they got, so the result can be told again on any retry.
    INSERT INTO usage_batch_orgs (batch_id, organization_id, rows_applied, overage_reports)
    SELECT p_batch, o.organization_id, coalesce(r.changed, 0), coalesce(q.reports, 0)
    FROM ub_orgs o
    LEFT JOIN (SELECT organization_id, count(*) AS changed FROM ub_moved
               WHERE total <> old_total GROUP BY organization_id) r ON r.organization_id = o.organization_id
    LEFT JOIN ub_outbox q ON q.organization_id = o.organization_id
    ORDER BY o.organization_id
    ON CONFLICT DO NOTHING;

    RETURN QUERY
    SELECT (SELECT b.rows_received FROM usage_batches b WHERE b.batch_id = p_batch),
           (SELECT coalesce(sum(a.rows_applied), 0)::bigint FROM usage_batch_orgs a WHERE a.batch_id = p_batch),
           (SELECT count(*) FROM usage_batch_rejections j WHERE j.batch_id = p_batch),
           (SELECT count(*) FROM ub_in i
            WHERE i.reason IS NULL
              AND EXISTS (SELECT 1 FROM usage_batch_skips k
                          WHERE k.batch_id = p_batch AND k.organization_id = i.organization_id)),
           (SELECT coalesce(sum(a.overage_reports), 0)::bigint FROM usage_batch_orgs a WHERE a.batch_id = p_batch),
           (SELECT count(*) FROM usage_batch_orgs a WHERE a.batch_id = p_batch),
           (SELECT count(*) FROM usage_batch_skips k WHERE k.batch_id = p_batch);
END
$$;
