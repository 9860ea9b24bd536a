-- Benchmark baseline, step 2 of 4: add the growth with the original increment function.
SELECT increment_project_usage(%(project_id)s, %(tag)s, %(month)s, %(delta)s) AS value_after
