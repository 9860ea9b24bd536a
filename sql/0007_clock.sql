-- The one clock every SQL statement reads. Production never sets `billing.now`, so this is now().
-- Tests move time on purpose, per database (`ALTER DATABASE … SET billing.now = '…'`, seen by new
-- connections) or per session (`SET billing.now = '…'`), so month and hour boundaries are crossed
-- deliberately and never by accident. New and changed SQL calls billing_now(), not now().
CREATE FUNCTION billing_now() RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(nullif(current_setting('billing.now', true), '')::timestamptz, now())
$$;
