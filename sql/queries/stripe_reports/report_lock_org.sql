-- Serialise the claims of one org (a claim is one short transaction; no lock is held across a Stripe
-- call). A session left idle by a vanished worker is ended, releasing the lock.
SELECT set_config('idle_in_transaction_session_timeout', %(idle_timeout)s, true),
       pg_advisory_xact_lock(21332, hashtext(%(org_id)s))
