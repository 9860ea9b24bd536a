-- Watermarks only move forward, whatever order two pulls finish in.
INSERT INTO sync_watermarks AS w (source, watermark)
VALUES (%(source)s, %(watermark)s)
ON CONFLICT (source) DO UPDATE
    SET watermark = greatest(w.watermark, EXCLUDED.watermark), updated_at = billing_now()
RETURNING watermark
