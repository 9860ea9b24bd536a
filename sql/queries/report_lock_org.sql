-- Serialise the reporters of one org: a second stripe-report workflow of the same org (another hour)
-- waits here until the first commits its page, so rows are never sent twice at once and always go
-- out oldest first. A session left idle by a vanished worker is ended, releasing the lock.
SELECT set_config('idle_in_transaction_session_timeout', %(idle_timeout)s, true),
       pg_advisory_xact_lock(21332, hashtext(%(org_id)s))
