-- The delivery window passed without a 2xx: given up. The last answer stays the reason shown.
UPDATE notifications
SET state = 'failed', last_error = coalesce(last_error, %(error)s)
WHERE id = %(id)s AND state <> 'delivered'
