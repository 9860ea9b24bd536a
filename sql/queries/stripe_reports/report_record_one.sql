-- Record one row's outcome in its own short transaction (see report_record_one in 0008).
SELECT report_record_one(%(id)s, %(attempt_id)s::uuid, %(outcome)s, %(reason)s, %(response)s::jsonb,
                         %(rotate)s, %(reported_by)s, %(lease)s::interval) AS recorded
