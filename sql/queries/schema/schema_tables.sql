-- The current schema, part 1: every table of the public schema with its columns in order (type,
-- NOT NULL, default) and storage options, as CREATE TABLE. Read from the catalog, so the same for
-- every PostgreSQL version the project runs on (billing/db/schema.py, sql/schema.sql).
SELECT 'CREATE TABLE ' || quote_ident(c.relname) || E' (\n'
       || string_agg(
              '    ' || quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
              || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
              || COALESCE(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), ''),
              E',\n' ORDER BY a.attnum)
       || E'\n)' || COALESCE(' WITH (' || array_to_string(c.reloptions, ', ') || ')', '') || ';' AS ddl
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
GROUP BY c.oid, c.relname, c.reloptions
ORDER BY c.relname
