-- The named rows of one org an operator acts on, locked for the act (in id order: the lock order).
SELECT id, identifier, status, quantity
FROM stripe_report_outbox
WHERE organization_id = %(org_id)s::uuid AND identifier = ANY(%(identifiers)s::text[])
ORDER BY id
FOR NO KEY UPDATE
