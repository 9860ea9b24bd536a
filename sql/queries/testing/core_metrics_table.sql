-- The core service's metrics table, as pull mode reads it (BILLING_METRICS_SOURCE_URL): created on a
-- throwaway database by the tests, the recorded histories and bench.soak, which play the core service.
CREATE TABLE metrics (
    project_id  uuid NOT NULL,
    tag         text NOT NULL,
    increment   bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (project_id, tag, created_at)
)
