"""``GET /v1/plans/{plan}`` reads what ``PUT`` sets (it answered 405 before)."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from billing.core.config import Settings
from tests.api_client import AUTH, api_client

TAGS = [
    "search.experience.agentic",
    "search.experience.embedding",
    "space.learned",
    "storage.usage",
    "task.created",
]


async def test_a_plan_reads_back_its_limits(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> None:
    async with api_client(settings, pool, client) as http:
        before = await http.get("/v1/plans/team", headers=AUTH)
        assert before.status_code == 200
        assert before.json()["plan"] == "team"
        assert sorted(before.json()["limits"]) == TAGS
        original = before.json()["limits"]["space.learned"]
        try:
            put = await http.put("/v1/plans/team", json={"limits": {"space.learned": 4242}}, headers=AUTH)
            assert put.status_code == 200
            after = await http.get("/v1/plans/team", headers=AUTH)
            assert after.json()["limits"] == {**before.json()["limits"], "space.learned": 4242}
        finally:
            await http.put("/v1/plans/team", json={"limits": {"space.learned": original}}, headers=AUTH)


async def test_an_unknown_plan_is_400_and_no_token_is_401(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> None:
    async with api_client(settings, pool, client) as http:
        unknown = await http.get("/v1/plans/gold", headers=AUTH)
        anonymous = await http.get("/v1/plans/free")
    assert unknown.status_code == 400
    assert unknown.json() == {
        "code": 400,
        "error": "bad_request",
        "msg": "unknown plan 'gold'; plans are free, pro and team",
    }
    assert anonymous.status_code == 401
