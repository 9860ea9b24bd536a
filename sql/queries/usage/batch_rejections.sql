SELECT idx AS index, reason
FROM usage_batch_rejections
WHERE batch_id = %(batch_id)s
ORDER BY idx
