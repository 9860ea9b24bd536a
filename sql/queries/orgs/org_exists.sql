SELECT EXISTS (SELECT 1 FROM organizations WHERE id = %(org_id)s::uuid) AS found
