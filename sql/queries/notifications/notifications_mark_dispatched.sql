-- Handed to Temporal (or not, when delivery is not configured). Only a 'recorded' row moves: its
-- workflow may already have delivered it.
UPDATE notifications
SET state = %(state)s, dispatched_at = billing_now(), last_error = coalesce(%(reason)s, last_error)
WHERE id = ANY (%(ids)s::bigint[]) AND state = 'recorded'
