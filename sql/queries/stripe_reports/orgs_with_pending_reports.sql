-- One page of orgs that have Stripe reports waiting (of one source, e.g. 'sync:<batch>', when given),
-- in id order, after a cursor. A row left 'sending' by a dead attempt is waiting too.
SELECT DISTINCT organization_id::text AS org_id
FROM stripe_report_outbox
WHERE status IN ('pending', 'sending')
  AND (%(source)s::text IS NULL OR source = %(source)s::text)
  AND (%(after_org_id)s::uuid IS NULL OR organization_id > %(after_org_id)s::uuid)
ORDER BY org_id
LIMIT %(page_size)s
