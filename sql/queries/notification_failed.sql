-- The delivery window passed without a 2xx: given up (an operator can see it and the reason).
UPDATE notifications
SET state = 'failed', last_error = coalesce(%(error)s, last_error)
WHERE id = %(id)s AND state <> 'delivered'
