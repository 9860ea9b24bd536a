-- The current schema, part 2: primary keys, unique, check, foreign key and exclusion constraints
-- (NOT NULL is on the columns), by table, kind and name.
SELECT 'ALTER TABLE ' || quote_ident(c.relname) || ' ADD CONSTRAINT ' || quote_ident(k.conname) || ' '
       || pg_get_constraintdef(k.oid) || ';' AS ddl
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND k.contype IN ('p', 'u', 'c', 'f', 'x')
ORDER BY c.relname, array_position(ARRAY['p', 'u', 'c', 'f', 'x'], k.contype::text), k.conname
