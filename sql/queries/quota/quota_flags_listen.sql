-- Start receiving the channel the quota_flags triggers notify (sql/0016); api/quota_cache.py.
LISTEN quota_flags
