-- Quota flags served from memory (issue 14): every API process keeps the set of flagged projects and
-- LISTENs on the channel `quota_flags` (api/quota_cache.py). Every statement that changes which
-- projects have a flag tells the listeners which projects to read again, in the writer's transaction,
-- so the notification is delivered only if, and once, the change commits.
--
-- Payload: project ids separated by commas, at most 200 per notification (PostgreSQL caps a payload
-- at 8,000 bytes); `*` after a TRUNCATE (read everything again). The listeners' own `ping:N`
-- notifications share the channel: PostgreSQL delivers notifications in commit order, so a listener
-- that receives its ping has received every change committed before it sent that ping (the bound
-- behind "a flag is enforced everywhere within a second", and behind the operator block's wait).
--
-- An UPDATE that keeps every row's project (a new reason or month) changes no project's answer and
-- tells nobody. NOTIFY serialises the commits of the transactions that use it; only writes that add or
-- remove flags do.

CREATE FUNCTION notify_quota_flags_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_projects uuid[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('quota_flags', '*');
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT project_id) INTO v_projects FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT project_id) INTO v_projects FROM old_rows;
    ELSE
        SELECT array_agg(project_id) INTO v_projects
        FROM ((SELECT project_id FROM old_rows EXCEPT SELECT project_id FROM new_rows)
              UNION
              (SELECT project_id FROM new_rows EXCEPT SELECT project_id FROM old_rows)) AS moved;
    END IF;
    PERFORM pg_notify('quota_flags', string_agg(project_id::text, ',' ORDER BY project_id))
    FROM (SELECT project_id, (row_number() OVER (ORDER BY project_id) - 1) / 200 AS chunk
          FROM unnest(v_projects) AS p (project_id)) AS numbered
    GROUP BY chunk;
    RETURN NULL;
END
$$;

-- PostgreSQL allows transition tables only on single-event triggers: one trigger per event.
CREATE TRIGGER quota_flags_inserted AFTER INSERT ON quota_flags
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION notify_quota_flags_changed();
CREATE TRIGGER quota_flags_deleted AFTER DELETE ON quota_flags
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION notify_quota_flags_changed();
CREATE TRIGGER quota_flags_updated AFTER UPDATE ON quota_flags
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_quota_flags_changed();
CREATE TRIGGER quota_flags_truncated AFTER TRUNCATE ON quota_flags
    FOR EACH STATEMENT EXECUTE FUNCTION notify_quota_flags_changed();
