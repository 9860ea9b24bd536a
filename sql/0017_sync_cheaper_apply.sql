-- The usage sync's apply, cheaper per row (issue 14). Redefines apply_usage_batch of 0009 with the
-- same results, the same locks and the same lock order (see 0004 and 0009); what changed:
--
-- * Checkpoints, project usage and org usage leave more room on each page (fillfactor 45, was 70). A
--   sync updates most checkpoints of a page at once, and an update stays on its page (HOT: no new
--   index entry) only while the page has room for the new version next to the old one, which a
--   transaction cannot prune. At 70, about 40% of a 100,000-row batch's checkpoint updates were HOT;
--   at 45, all of them. Tables written before this migration keep their pages until rewritten
--   (VACUUM FULL or pg_repack); new pages follow the new setting.
-- * Counter checkpoints: the upsert's RETURNING is summed per project, meter and month in the same
--   statement, instead of written row by row to a temp table (ub_moved, kept for gauges) and read
--   back. Rows that went backwards are found by comparing the batch's rows with their (now locked)
--   checkpoints, as before; a row the upsert moved can never look backwards against itself.
-- * The counters' project usage upsert writes the ledger in the same statement from its RETURNING,
--   instead of writing the value before back into the temp table and reading it again.
-- * Rows rejected in step 1 are skipped by the later statements instead of deleted from ub_in.
-- * A batch may be applied in two parts, in parallel transactions (the usage-sync workflow runs one
--   activity per part): each part takes the orgs that usage_batch_part() gives it, and rows of no
--   known org go to part 0. Parts share no row: a project belongs to one org, and every row the
--   apply locks or writes (checkpoints, project and org usage, resets, flags, the outbox, the
--   batch's per-org bookkeeping) belongs to one org, so the two never wait for each other. Each part
--   answers for its own orgs (and part 0 for the rows of none); the workflow adds the answers up.

ALTER TABLE counter_checkpoints SET (fillfactor = 45);
ALTER TABLE project_usage SET (fillfactor = 45);
ALTER TABLE org_usage SET (fillfactor = 45);

-- Which part of a batch an org's rows are applied in (0 or 1). Fixed here, so every apply of a
-- batch, whoever runs it, splits it alike.
CREATE FUNCTION usage_batch_part(p_org uuid) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT uuid_hash(p_org) & 1 $$;

-- Applies the staged rows of one batch in the caller's transaction, set-based: the whole batch
-- (p_part NULL), or the orgs of one part (0 or 1). The steps and their rules are those of 0009
-- (where each is explained); only how the rows travel between them changed.
DROP FUNCTION apply_usage_batch(text);
CREATE FUNCTION apply_usage_batch(p_batch text, p_part integer DEFAULT NULL)
RETURNS TABLE (rows_received integer, rows_applied bigint, rows_rejected bigint, rows_pending bigint,
               overage_reports bigint, orgs_applied bigint, orgs_skipped bigint)
LANGUAGE plpgsql
-- A 100,000-row batch sorts and hashes in memory rather than on disk.
SET work_mem = '64MB'
AS $$
DECLARE
    v_now        timestamptz := billing_now();
    v_hour       timestamptz := date_trunc('hour', v_now, 'UTC');
    v_this_month date := date_trunc('month', v_now AT TIME ZONE 'UTC')::date;
    v_month      date;
    v_rejected   bigint;
BEGIN
    -- One apply of a batch (or of a part of it) at a time: a retried attempt waits for a straggling
    -- one, then finds what it applied in usage_batch_orgs and leaves it alone. A whole-batch apply
    -- excludes every part; the two parts exclude only themselves. Taken before any row lock.
    IF p_part IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('usage-batch:' || p_batch, 0));
    ELSIF p_part IN (0, 1) THEN
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('usage-batch:' || p_batch, 0));
        PERFORM pg_advisory_xact_lock(hashtextextended('usage-batch:' || p_batch || ':part:' || p_part, 0));
    ELSE
        RAISE EXCEPTION 'part % of a batch: there are parts 0 and 1', p_part
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- 1. Every staged row not rejected before (a rejection is final for its batch, so the same body
    -- pushed again is answered alike), with its meter, org and month; why a row can never apply.
    CREATE TEMP TABLE ub_in ON COMMIT DROP AS
    SELECT s.idx, s.project_id, s.tag, s.created_at, s.updated_at, s.total, m.kind, p.organization_id,
           usage_month(m.kind, s.created_at, s.updated_at) AS month,
           usage_row_problem(s.tag, m.tag IS NOT NULL, s.project_id, p.project_id IS NOT NULL, m.kind,
                             s.created_at, s.updated_at, s.total, v_now) AS reason
    FROM usage_batch_rows s
    LEFT JOIN meters m ON m.tag = s.tag
    LEFT JOIN organization_projects p ON p.project_id = s.project_id
    WHERE s.batch_id = p_batch
      AND NOT EXISTS (SELECT 1 FROM usage_batch_rejections j WHERE j.batch_id = p_batch AND j.idx = s.idx)
      AND (p_part IS NULL OR coalesce(usage_batch_part(p.organization_id), 0) = p_part);

    INSERT INTO usage_batch_rejections (batch_id, idx, reason)
    SELECT p_batch, idx, reason FROM ub_in WHERE reason IS NOT NULL
    ON CONFLICT DO NOTHING;

    -- 2. The orgs this run may still apply rows of: not applied by an earlier run of the batch, or
    -- applied only through an older month (done_through).
    CREATE TEMP TABLE ub_orgs ON COMMIT DROP AS
    SELECT g.organization_id, a.applied_through AS done_through, NULL::date AS open_month
    FROM (SELECT DISTINCT organization_id FROM ub_in WHERE reason IS NULL) g
    LEFT JOIN usage_batch_orgs a ON a.batch_id = p_batch AND a.organization_id = g.organization_id
    WHERE a.organization_id IS NULL OR a.applied_through IS NOT NULL;

    -- An org never seen before has no month to close: open this month for it here rather than run a
    -- reset workflow that would do nothing (lock order: monthly_resets first). Every such first batch
    -- claims the same month (by the database clock), so concurrent first batches agree.
    INSERT INTO monthly_resets (organization_id, month)
    SELECT o.organization_id, v_this_month
    FROM ub_orgs o
    WHERE NOT EXISTS (SELECT 1 FROM monthly_resets r WHERE r.organization_id = o.organization_id)
      AND NOT EXISTS (SELECT 1 FROM org_usage u WHERE u.organization_id = o.organization_id)
    ORDER BY o.organization_id
    ON CONFLICT DO NOTHING;

    UPDATE ub_orgs o
    SET open_month = (SELECT max(r.month) FROM monthly_resets r WHERE r.organization_id = o.organization_id);

    -- Held back: rows of a month not yet opened for their org (its reset must close the month before
    -- and carry gauges first). Only those: the org's rows of open months apply now.
    CREATE TEMP TABLE ub_held ON COMMIT DROP AS
    SELECT i.organization_id, min(i.month) AS month, count(*) AS held_rows
    FROM ub_in i
    JOIN ub_orgs o ON o.organization_id = i.organization_id
    WHERE i.reason IS NULL AND (o.open_month IS NULL OR i.month > o.open_month)
    GROUP BY i.organization_id;

    -- The batch's held-back orgs are exactly these now; a reason the reset check recorded is kept.
    DELETE FROM usage_batch_skips k
    WHERE k.batch_id = p_batch
      AND (p_part IS NULL OR usage_batch_part(k.organization_id) = p_part)
      AND NOT EXISTS (SELECT 1 FROM ub_held h WHERE h.organization_id = k.organization_id);
    INSERT INTO usage_batch_skips (batch_id, organization_id, month, reason)
    SELECT p_batch, organization_id, month,
           format('monthly-reset/%s/%s has not completed', organization_id, to_char(month, 'YYYY-MM'))
    FROM ub_held
    ORDER BY organization_id
    ON CONFLICT DO NOTHING;

    -- 3. The newest version of each row to apply now (a batch may carry a row several times): months
    -- open for the org and not applied by an earlier run of the batch.
    CREATE TEMP TABLE ub_rows ON COMMIT DROP AS
    SELECT DISTINCT ON (i.project_id, i.tag, i.created_at)
           i.idx, i.project_id, i.tag, i.created_at, i.updated_at, i.total, i.kind, i.organization_id,
           i.month
    FROM ub_in i
    JOIN ub_orgs o ON o.organization_id = i.organization_id
    WHERE i.reason IS NULL AND i.month <= o.open_month AND (o.done_through IS NULL OR i.month > o.done_through)
    ORDER BY i.project_id, i.tag, i.created_at, i.updated_at DESC, i.total DESC, i.idx DESC;

    -- 4. Move every checkpoint of the batch, in key order, in one upsert that also says what it moved
    -- from: a new row is inserted (nothing to diff against); an existing one is locked and, when the
    -- row grew, updated with its old values kept in previous_*. ON CONFLICT waits for a concurrent
    -- batch holding the same checkpoint and then sees its committed values, so the diff is always
    -- against the newest total, never a stale one. A row that went backwards, or is unchanged, is
    -- locked but not updated (the WHERE), and so not returned. Counter rows moved are summed per
    -- project, meter and month (ub_pu: the growth and how many rows grew) and per org (ub_counts: rows
    -- moved and rows that changed) in the same statement; gauge rows (few) go to ub_moved one by one.
    CREATE TEMP TABLE ub_moved (
        project_id uuid, tag text, created_at timestamptz, updated_at timestamptz, total bigint,
        old_total bigint, kind text, organization_id uuid, month date
    ) ON COMMIT DROP;
    CREATE TEMP TABLE ub_pu (
        project_id uuid, tag text, month date, organization_id uuid, is_gauge boolean, amount bigint,
        old_value bigint, is_new boolean, counter_rows integer
    ) ON COMMIT DROP;
    CREATE TEMP TABLE ub_counts (organization_id uuid, moved bigint, changed bigint) ON COMMIT DROP;

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
        RETURNING c.project_id, c.tag, c.row_created_at, c.applied_total - coalesce(c.previous_total, 0) AS growth
    ), grouped AS (
        SELECT v.project_id, v.tag, usage_month('counter', v.row_created_at, v.row_created_at) AS month,
               p.organization_id, sum(v.growth)::bigint AS amount, count(*) AS moved,
               count(*) FILTER (WHERE v.growth > 0) AS grew
        FROM moved v
        JOIN organization_projects p ON p.project_id = v.project_id
        GROUP BY v.project_id, v.tag, 3, p.organization_id
    ), counted AS (
        INSERT INTO ub_counts
        SELECT organization_id, sum(moved), sum(grew) FROM grouped GROUP BY organization_id
    )
    INSERT INTO ub_pu
    SELECT project_id, tag, month, organization_id, false, amount, 0, false, grew::integer
    FROM grouped
    WHERE amount > 0;

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
    IF (SELECT coalesce(sum(moved), 0) FROM ub_counts) + (SELECT count(*) FROM ub_moved)
       < (SELECT count(*) FROM ub_rows) THEN
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
        WHERE (r.updated_at < c.row_updated_at OR (r.kind = 'counter' AND r.total < c.applied_total))
        ON CONFLICT DO NOTHING;
    END IF;

    -- 6. Per project, meter and month: counters add their growth (summed above); a gauge takes its
    -- newest level.
    INSERT INTO ub_pu
    SELECT DISTINCT ON (project_id, tag) project_id, tag, month, organization_id, true, total, 0::bigint, false, 1
    FROM ub_moved
    WHERE kind = 'gauge'
    ORDER BY project_id, tag, updated_at DESC, created_at DESC;
    INSERT INTO ub_counts
    SELECT organization_id, count(*), count(*) FILTER (WHERE total <> old_total)
    FROM ub_moved
    GROUP BY organization_id;

    -- Counters add their growth in one upsert, in key order; the value after comes back and goes
    -- straight to the ledger (7): what this batch changed of each project's usage of a meter and
    -- month, with how many counter rows it came from and the value after. (The rows themselves stay
    -- in usage_batch_rows under the batch id, so nothing of the detail is lost.) In the order of the
    -- ledger's org-and-month index: appending to it is far cheaper than scattering.
    WITH added AS (
        INSERT INTO project_usage AS u (project_id, tag, month, organization_id, value)
        SELECT project_id, tag, month, organization_id, amount
        FROM ub_pu
        WHERE NOT is_gauge
        ORDER BY project_id, tag, month
        ON CONFLICT (project_id, tag, month) DO UPDATE SET value = u.value + EXCLUDED.value, updated_at = now()
        RETURNING u.project_id, u.tag, u.month, u.value
    )
    INSERT INTO usage_ledger
        (batch_id, organization_id, project_id, tag, month, counter_rows, delta, value_after)
    SELECT p_batch, t.organization_id, t.project_id, t.tag, t.month, t.counter_rows, t.amount, a.value
    FROM added a
    JOIN ub_pu t ON NOT t.is_gauge AND t.project_id = a.project_id AND t.tag = a.tag AND t.month = a.month
    ORDER BY t.organization_id, t.month;

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

    -- 7. The ledger of the gauges: the level's change and the level after.
    INSERT INTO usage_ledger
        (batch_id, organization_id, project_id, tag, month, counter_rows, delta, value_after)
    SELECT p_batch, organization_id, project_id, tag, month, counter_rows, amount - old_value, amount
    FROM ub_pu
    WHERE is_gauge AND amount <> old_value
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
    -- an included quantity of the org's plan in the month open for it (every other cause of a flag
    -- change -- plan, payment status, limits, projects, the monthly reset -- recomputes flags itself),
    -- so only those orgs, and blocked ones, are candidates.
    CREATE TEMP TABLE ub_flag_orgs ON COMMIT DROP AS
    SELECT c.organization_id, bool_or(c.always) AS always, max(c.crossed) AS crossed, NULL::date AS open_month
    FROM (
        SELECT o.organization_id, false AS always, o.month AS crossed
        FROM ub_ou o
        JOIN ub_orgs g ON g.organization_id = o.organization_id AND g.open_month = o.month
        LEFT JOIN organization_billing b ON b.organization_id = o.organization_id
        JOIN plan_limits l ON l.plan = coalesce(b.plan, 'free') AND l.tag = o.tag
        WHERE (o.value_after > l.included) <> (o.value_after - o.delta > l.included)
        UNION ALL
        -- Payment blocks flag every project whatever the usage; the dashboard may write the status
        -- straight into organization_billing, so blocked orgs (and ones still carrying block flags)
        -- are always recomputed. They are few.
        SELECT g.organization_id, true, NULL::date
        FROM ub_orgs g
        LEFT JOIN organization_billing b ON b.organization_id = g.organization_id
        WHERE b.payment_status = 'blocked'
           OR EXISTS (SELECT 1 FROM quota_flags f
                      WHERE f.organization_id = g.organization_id AND f.reason = 'payment_blocked')
    ) c
    GROUP BY c.organization_id;

    -- The candidates are locked first, in id order, so the per-month calls below cannot interleave
    -- with another batch's (or a reset's) in a different order.
    PERFORM 1 FROM organizations
    WHERE id IN (SELECT organization_id FROM ub_flag_orgs)
    ORDER BY id
    FOR NO KEY UPDATE;
    -- Under the org's lock, the month open now (not the one read in step 2): a monthly reset that
    -- committed while this batch ran has already recomputed the flags against its new month, and a
    -- crossing in the month it closed must not flag the org again. A reset still running waits for
    -- this lock and recomputes after us. So whichever commits second uses the newest month.
    UPDATE ub_flag_orgs f
    SET open_month = (SELECT max(r.month) FROM monthly_resets r WHERE r.organization_id = f.organization_id);
    DELETE FROM ub_flag_orgs WHERE NOT always AND crossed IS DISTINCT FROM open_month;
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
               least(v_now, ((o.month + interval '1 month') AT TIME ZONE 'UTC') - interval '1 second'),
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

    -- 11. Mark how far each org is applied, with what it got, so a retry tells the same result and a
    -- later run applies only the months held back now.
    INSERT INTO usage_batch_orgs AS a (batch_id, organization_id, rows_applied, overage_reports, applied_through)
    SELECT p_batch, o.organization_id, coalesce(r.changed, 0), coalesce(q.reports, 0), o.open_month
    FROM ub_orgs o
    LEFT JOIN (SELECT organization_id, sum(changed) AS changed FROM ub_counts
               GROUP BY organization_id) r ON r.organization_id = o.organization_id
    LEFT JOIN ub_outbox q ON q.organization_id = o.organization_id
    WHERE o.open_month IS NOT NULL
    ORDER BY o.organization_id
    ON CONFLICT (batch_id, organization_id) DO UPDATE
        SET rows_applied = a.rows_applied + EXCLUDED.rows_applied,
            overage_reports = a.overage_reports + EXCLUDED.overage_reports,
            applied_through = EXCLUDED.applied_through, applied_at = now();

    -- The answer: the whole batch's, or the part's (its orgs; part 0 also the rows of no known org
    -- and the rows the stager refused).
    IF p_part IS NULL THEN
        v_rejected := (SELECT count(*) FROM usage_batch_rejections j WHERE j.batch_id = p_batch);
    ELSE
        v_rejected := (
            SELECT count(*)
            FROM usage_batch_rejections j
            LEFT JOIN usage_batch_rows s ON s.batch_id = j.batch_id AND s.idx = j.idx
            LEFT JOIN organization_projects p ON p.project_id = s.project_id
            WHERE j.batch_id = p_batch AND coalesce(usage_batch_part(p.organization_id), 0) = p_part);
    END IF;
    RETURN QUERY
    SELECT (SELECT b.rows_received FROM usage_batches b WHERE b.batch_id = p_batch),
           coalesce(sum(a.rows_applied), 0)::bigint,
           v_rejected,
           (SELECT coalesce(sum(h.held_rows), 0)::bigint FROM ub_held h),
           coalesce(sum(a.overage_reports), 0)::bigint,
           count(a.organization_id),
           (SELECT count(*) FROM ub_held)
    FROM usage_batch_orgs a
    WHERE a.batch_id = p_batch AND (p_part IS NULL OR usage_batch_part(a.organization_id) = p_part);
END
$$;
