-- The org's oldest pending rows, locked until the page's transaction ends, with what Stripe needs.
SELECT o.id, o.identifier, o.quantity, o.event_timestamp, m.stripe_event_name, b.stripe_customer_id
FROM stripe_report_outbox o
JOIN meters m ON m.tag = o.tag
JOIN organization_billing b ON b.organization_id = o.organization_id
WHERE o.organization_id = %(org_id)s::uuid AND o.status = 'pending'
ORDER BY o.id
LIMIT %(page_size)s
FOR NO KEY UPDATE OF o
