-- One plan's included quantity per meter (a meter without a row is unlimited: null).
SELECT m.tag, l.included
FROM meters m
LEFT JOIN plan_limits l ON l.plan = %(plan)s AND l.tag = m.tag
ORDER BY m.tag
