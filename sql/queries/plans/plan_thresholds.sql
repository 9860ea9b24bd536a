SELECT coalesce(array_agg(percent ORDER BY percent), '{}') AS percents
FROM plan_thresholds
WHERE plan = %(plan)s
