SELECT tag FROM meters ORDER BY tag
