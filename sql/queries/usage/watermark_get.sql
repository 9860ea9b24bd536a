SELECT watermark FROM sync_watermarks WHERE source = %(source)s
