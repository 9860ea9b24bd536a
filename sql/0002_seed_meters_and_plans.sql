-- The five meters and three plans of the original system.
INSERT INTO meters (tag, stripe_event_name, kind, resets_monthly, limit_name) VALUES
    ('task.created',                'agent_tasks',          'counter', true,  'max_task'),
    ('space.learned',               'skill_blocks',         'counter', true,  'max_skill'),
    ('search.experience.embedding', 'fast_skill_search',    'counter', true,  'max_fast_skill_search'),
    ('search.experience.agentic',   'agentic_skill_search', 'counter', true,  'max_agentic_skill_search'),
    ('storage.usage',               'storage_gb_hour',      'gauge',   false, 'max_storage');

INSERT INTO plans (name) VALUES ('free'), ('pro'), ('team');

-- Defaults only: operators change them with PUT /v1/plans/{plan}.
INSERT INTO plan_limits (plan, tag, included) VALUES
    ('free', 'task.created',                1000),
    ('free', 'space.learned',               100),
    ('free', 'search.experience.embedding', 1000),
    ('free', 'search.experience.agentic',   100),
    ('free', 'storage.usage',               1073741824),
    ('pro',  'task.created',                50000),
    ('pro',  'space.learned',               5000),
    ('pro',  'search.experience.embedding', 50000),
    ('pro',  'search.experience.agentic',   5000),
    ('pro',  'storage.usage',               53687091200),
    ('team', 'task.created',                250000),
    ('team', 'space.learned',               25000),
    ('team', 'search.experience.embedding', 250000),
    ('team', 'search.experience.agentic',   25000),
    ('team', 'storage.usage',               268435456000);
