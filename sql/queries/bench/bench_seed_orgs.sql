-- Benchmark set-up: organizations on the free plan, and their projects.
WITH orgs AS (
    INSERT INTO organizations (id, name)
    SELECT id, 'bench' FROM unnest(%(org_ids)s::uuid[]) AS given (id)
    RETURNING id
), billing AS (
    INSERT INTO organization_billing (organization_id, plan) SELECT id, %(plan)s FROM orgs
)
INSERT INTO organization_projects (organization_id, project_id, name)
SELECT org_id, project_id, 'bench'
FROM unnest(%(project_orgs)s::uuid[], %(project_ids)s::uuid[]) AS given (org_id, project_id)
