-- The current schema, part 4: functions and procedures as last defined (the newest migration's
-- CREATE OR REPLACE wins), by name and argument types.
SELECT rtrim(pg_get_functiondef(p.oid), E'\n') || ';' AS ddl
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND p.prokind IN ('f', 'p')
ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)
