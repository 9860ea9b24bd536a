-- Attach a project to an org. No row comes back when the project belongs to another org.
INSERT INTO organization_projects AS p (organization_id, project_id, name)
VALUES (%(org_id)s::uuid, %(project_id)s::uuid, %(name)s)
ON CONFLICT (project_id) DO UPDATE SET name = coalesce(EXCLUDED.name, p.name)
    WHERE p.organization_id = EXCLUDED.organization_id
RETURNING organization_id::text AS org_id, project_id::text AS project_id, name
