-- A listener's own marker on the channel: delivered after every change committed before it (sql/0016).
SELECT pg_notify('quota_flags', %(payload)s)
