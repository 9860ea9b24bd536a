-- The newest operator acts on an org's Stripe report rows.
SELECT a.action, a.actor, a.reason, a.at, a.from_status, a.old_identifier, a.new_identifier, o.quantity
FROM stripe_report_actions a
JOIN stripe_report_outbox o ON o.id = a.outbox_id
WHERE a.organization_id = %(org_id)s::uuid
ORDER BY a.at DESC, a.id DESC
LIMIT %(limit)s
