-- Give back the rows an attempt claimed but did not send (see report_release in 0008).
SELECT report_release(%(attempt_id)s::uuid) AS released
