-- One operator act on named rows (already checked and locked by report_rows_for_action), recorded
-- with who, when and why in stripe_report_actions, in the same statement:
--  void      pending / failed / uncertain -> voided (the only way a queued row is not sent)
--  mark_sent uncertain -> sent (Stripe counted it: reconcile showed it)
--  resend    failed / uncertain -> pending under a new identifier derived from the old one (the old one
--            is kept in previous_identifiers), with a fresh first attempt, timestamp and key.
WITH acted AS (
    UPDATE stripe_report_outbox o
    SET status = CASE %(action)s WHEN 'void' THEN 'voided' WHEN 'mark_sent' THEN 'sent' ELSE 'pending' END,
        status_reason = CASE %(action)s WHEN 'void' THEN 'voided' WHEN 'mark_sent' THEN 'marked sent'
                                        ELSE 'sent again' END
            || ' by ' || %(actor)s || ' at '
            || to_char(billing_now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI"Z"') || ': ' || %(reason)s,
        identifier = CASE WHEN %(action)s = 'resend' THEN
            CASE WHEN length(o.identifier) <= 94
                 THEN o.identifier || '-r' || (cardinality(o.previous_identifiers) + 1)
                 ELSE left(o.identifier, 80) || '-' || left(md5(o.identifier), 8) || '-r'
                      || (cardinality(o.previous_identifiers) + 1) END
            ELSE o.identifier END,
        previous_identifiers = CASE WHEN %(action)s = 'resend'
            THEN o.previous_identifiers || o.identifier ELSE o.previous_identifiers END,
        first_attempt_at = CASE WHEN %(action)s = 'resend' THEN NULL ELSE o.first_attempt_at END,
        sent_timestamp = CASE WHEN %(action)s = 'resend' THEN NULL ELSE o.sent_timestamp END,
        sent_late = CASE WHEN %(action)s = 'resend' THEN false ELSE o.sent_late END,
        key_generation = CASE WHEN %(action)s = 'resend' THEN 0 ELSE o.key_generation END,
        sent_at = CASE WHEN %(action)s = 'mark_sent' THEN billing_now() ELSE o.sent_at END,
        reported_by = CASE WHEN %(action)s = 'mark_sent' THEN 'operator:' || %(actor)s ELSE o.reported_by END,
        attempt_id = NULL,
        lease_until = NULL
    WHERE o.organization_id = %(org_id)s::uuid AND o.id = ANY(%(ids)s::bigint[])
    RETURNING o.id, o.organization_id, o.identifier,
              CASE WHEN %(action)s = 'resend' THEN o.previous_identifiers[cardinality(o.previous_identifiers)]
                   ELSE o.identifier END AS old_identifier
)
INSERT INTO stripe_report_actions
    (outbox_id, organization_id, action, actor, reason, from_status, old_identifier, new_identifier)
SELECT a.id, a.organization_id, %(action)s, %(actor)s, %(reason)s, f.from_status, a.old_identifier,
       CASE WHEN %(action)s = 'resend' THEN a.identifier END
FROM acted a
JOIN unnest(%(ids)s::bigint[], %(from_statuses)s::text[]) AS f (id, from_status) ON f.id = a.id
ORDER BY a.id
RETURNING outbox_id, old_identifier, new_identifier
