-- Replace a plan's notification thresholds (percentages of each included quantity).
WITH gone AS (
    DELETE FROM plan_thresholds WHERE plan = %(plan)s AND NOT (percent = ANY (%(percents)s::integer[]))
)
INSERT INTO plan_thresholds (plan, percent)
SELECT %(plan)s, p FROM unnest(%(percents)s::integer[]) AS p
ORDER BY p
ON CONFLICT DO NOTHING
