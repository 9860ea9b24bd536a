-- Claim a short page of one org's oldest claimable rows for one attempt (see report_claim in 0008).
SELECT * FROM report_claim(%(org_id)s::uuid, %(page_size)s, %(attempt_id)s::uuid,
                           %(lease)s::interval, %(grace)s::interval)
