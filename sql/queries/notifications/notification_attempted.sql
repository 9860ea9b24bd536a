-- One delivery attempt's outcome. A delivered row stays delivered.
UPDATE notifications
SET attempts = attempts + 1,
    last_error = CASE WHEN %(delivered)s THEN last_error ELSE %(error)s END,
    state = CASE WHEN state = 'delivered' OR %(delivered)s THEN 'delivered' ELSE state END,
    delivered_at = CASE WHEN %(delivered)s AND delivered_at IS NULL THEN billing_now() ELSE delivered_at END
WHERE id = %(id)s
