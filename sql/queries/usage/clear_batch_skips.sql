-- Each reset check of a batch replaces the previous one's verdict.
DELETE FROM usage_batch_skips WHERE batch_id = %(batch_id)s
