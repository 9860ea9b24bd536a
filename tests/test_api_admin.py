"""Admin endpoints, health, metrics and authentication of the HTTP API."""

from __future__ import annotations

import uuid

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.core.config import Settings
from tests.api_client import AUTH, api_client
from tests.factories import fetch_value


async def test_org_project_and_plan_lifecycle(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> None:
    org_id, project_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with api_client(settings, pool, client) as http:
        created = await http.put(f"/v1/orgs/{org_id}", json={"name": "Acme"}, headers=AUTH)
        assert created.status_code == 200
        assert created.json()["plan"] == "free"
        assert created.json()["payment_status"] == "ok"

        upgraded = await http.put(
            f"/v1/orgs/{org_id}", json={"plan": "pro", "stripe_customer_id": "cus_Acme1"}, headers=AUTH
        )
        assert upgraded.json()["plan"] == "pro"
        assert upgraded.json()["name"] == "Acme"
        assert upgraded.json()["stripe_customer_id"] == "cus_Acme1"

        attached = await http.put(
            f"/v1/orgs/{org_id}/projects/{project_id}", json={"name": "web"}, headers=AUTH
        )
        assert attached.status_code == 200
        assert attached.json() == {"org_id": org_id, "project_id": project_id, "name": "web"}

        other = str(uuid.uuid4())
        await http.put(f"/v1/orgs/{other}", json={}, headers=AUTH)
        stolen = await http.put(f"/v1/orgs/{other}/projects/{project_id}", json={}, headers=AUTH)
        assert stolen.status_code == 409
        assert stolen.json()["error"] == "conflict"

        limits = await http.put("/v1/plans/team", json={"limits": {"task.created": 300000}}, headers=AUTH)
        assert limits.status_code == 200
        status = await http.get(f"/v1/orgs/{org_id}", headers=AUTH)
        assert status.status_code == 200
        assert {meter["tag"] for meter in status.json()["usage"]} == {
            "task.created",
            "space.learned",
            "search.experience.embedding",
            "search.experience.agentic",
            "storage.usage",
        }
    owner = await fetch_value(
        pool, "SELECT organization_id::text FROM organization_projects WHERE project_id = %s", [project_id]
    )
    assert owner == org_id
    included = await fetch_value(
        pool, "SELECT included FROM plan_limits WHERE plan = 'team' AND tag = 'task.created'"
    )
    assert included == 300000


async def test_lowering_a_free_limit_flags_projects_at_once(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> None:
    org_id, project_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with api_client(settings, pool, client) as http:
        await http.put(f"/v1/orgs/{org_id}", json={}, headers=AUTH)
        await http.put(f"/v1/orgs/{org_id}/projects/{project_id}", json={}, headers=AUTH)
        async with pool.connection() as conn:
            await conn.execute(
                "SELECT increment_project_usage(%s, 'search.experience.agentic', date_trunc('month', billing_now() AT TIME ZONE 'UTC')::date, 60)",
                [project_id],
            )
        flagged_before = await fetch_value(
            pool, "SELECT count(*) FROM quota_flags WHERE project_id = %s", [project_id]
        )
        await http.put("/v1/plans/free", json={"limits": {"search.experience.agentic": 50}}, headers=AUTH)
        flagged_after = await fetch_value(
            pool, "SELECT count(*) FROM quota_flags WHERE project_id = %s", [project_id]
        )
        await http.put("/v1/plans/free", json={"limits": {"search.experience.agentic": 100}}, headers=AUTH)
        flagged_restored = await fetch_value(
            pool, "SELECT count(*) FROM quota_flags WHERE project_id = %s", [project_id]
        )
    assert (flagged_before, flagged_after, flagged_restored) == (0, 1, 0)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "fragment"),
    [
        ("PUT", "/v1/orgs/not-a-uuid", {}, 400, "org_id must be a UUID"),
        ("PUT", "/v1/orgs/{org}", {"plan": "gold"}, 400, "plan"),
        ("PUT", "/v1/orgs/{org}", {"plan": "pro", "extra": 1}, 400, "extra"),
        ("PUT", "/v1/orgs/{org}", "not json", 400, "not valid JSON"),
        ("PUT", "/v1/orgs/{org}/projects/{project}", {}, 404, "does not exist"),
        ("PUT", "/v1/plans/enterprise", {"limits": {}}, 400, "unknown plan"),
        ("PUT", "/v1/plans/pro", {"limits": {"tasks": 5}}, 400, "unknown meter tag 'tasks'"),
        ("PUT", "/v1/plans/pro", {"limits": {"task.created": -1}}, 400, "must not be negative"),
        ("PUT", "/v1/plans/pro", {"limits": {"task.created": "many"}}, 400, "limits.task.created"),
        ("GET", "/v1/orgs/{org}", None, 404, "does not exist"),
        ("DELETE", "/v1/orgs/{org}", None, 405, "not allowed"),
        ("GET", "/v1/nothing", None, 404, "no such endpoint"),
    ],
)
async def test_bad_admin_requests_get_a_clear_error_and_change_nothing(
    settings: Settings,
    pool: AsyncConnectionPool,
    client: Client,
    method: str,
    path: str,
    body: object,
    status: int,
    fragment: str,
) -> None:
    url = path.format(org=uuid.uuid4(), project=uuid.uuid4())
    before = await fetch_value(
        pool, "SELECT md5(string_agg(plan || tag || included, ',' ORDER BY plan, tag)) FROM plan_limits"
    )
    orgs_before = await fetch_value(pool, "SELECT count(*) FROM organizations")
    async with api_client(settings, pool, client) as http:
        content = body if isinstance(body, str) else None
        response = await http.request(
            method,
            url,
            headers=AUTH,
            json=None if content is not None or body is None else body,
            content=content,
        )
    assert response.status_code == status
    payload = response.json()
    assert payload["code"] == status
    assert fragment in payload["msg"]
    assert (
        await fetch_value(
            pool, "SELECT md5(string_agg(plan || tag || included, ',' ORDER BY plan, tag)) FROM plan_limits"
        )
        == before
    )
    assert await fetch_value(pool, "SELECT count(*) FROM organizations") == orgs_before


async def test_a_wrong_token_is_401_and_marked_unauthenticated_on_the_span(
    settings: Settings, pool: AsyncConnectionPool, client: Client, spans: InMemorySpanExporter
) -> None:
    async with api_client(settings, pool, client) as http:
        missing = await http.get(f"/v1/orgs/{uuid.uuid4()}")
        wrong = await http.get(f"/v1/orgs/{uuid.uuid4()}", headers={"Authorization": "Bearer nope"})
        right = await http.get(f"/v1/orgs/{uuid.uuid4()}", headers=AUTH)
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 404)
    marks = [span.attributes.get("authenticated") for span in spans.get_finished_spans()]
    assert marks == [False, False, True]
    assert {span.name for span in spans.get_finished_spans()} == {"GET /v1/orgs/{org_id}"}


async def test_health_and_metrics(settings: Settings, pool: AsyncConnectionPool, client: Client) -> None:
    async with api_client(settings, pool, client) as http:
        health = await http.get("/healthz")
        metrics = await http.get("/metrics")
    assert health.status_code == 200
    assert health.json() == {"ok": True, "postgres": "ok", "temporal": "ok"}
    assert metrics.status_code == 200
    assert "billing_http_requests_total" in metrics.text


async def test_health_is_503_naming_postgres_when_it_is_gone(
    settings: Settings, client: Client, database_url: str
) -> None:
    from billing.db.pool import open_pool

    doomed = await open_pool(database_url, max_size=1)
    await doomed.close()
    async with api_client(settings, doomed, client) as http:
        health = await http.get("/healthz")
    assert health.status_code == 503
    assert health.json()["postgres"].startswith("unavailable")
    assert health.json()["temporal"] == "ok"
