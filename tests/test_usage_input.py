"""Bad input to the usage endpoints: a clear answer, and every stored number as it was."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg_pool import AsyncConnectionPool

from tests.factories import make_org
from tests.usage_support import day_start, http, push, row, usage_snapshot, utc_now

__all__ = ["http"]


async def test_every_bad_row_is_rejected_with_its_reason_and_changes_nothing(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool)
    project = org.project_ids[0]
    today = day_start(utc_now())
    applied_at = today + timedelta(seconds=30)
    await push(http, [row(project, "task.created", today, 10, updated_at=applied_at)])
    before = await usage_snapshot(pool)

    good = row(project, "space.learned", today, 5)
    no_tag = {key: value for key, value in good.items() if key != "tag"}
    bad_rows = [
        no_tag,
        {**good, "tag": "tasks.made"},
        {**good, "project_id": str(uuid.uuid4())},
        {**good, "project_id": "not-a-uuid"},
        {**good, "increment": -1},
        {**good, "increment": 1.5},
        {**good, "increment": "7"},
        {**good, "increment": True},
        {**good, "created_at": "yesterday"},
        {**good, "updated_at": "2026-13-45T99:00:00Z"},
        row(project, "task.created", today, 9, updated_at=applied_at + timedelta(seconds=5)),  # smaller
        {**good, "updated_at": (utc_now() + timedelta(days=2)).isoformat()},
    ]
    answer = await push(http, bad_rows)
    assert [entry["index"] for entry in answer["rejected"]] == list(range(len(bad_rows)))
    reasons = [entry["reason"] for entry in answer["rejected"]]
    assert reasons[0] == "missing field tag"
    assert reasons[1] == 'unknown tag "tasks.made"'
    assert reasons[2] == f"unknown project {bad_rows[2]['project_id']}"
    assert reasons[3] == "project_id is not a UUID: 'not-a-uuid'"
    assert reasons[4] == "increment must be a non-negative integer, got -1"
    assert reasons[5] == "increment must be a non-negative integer, got 1.5"
    assert reasons[6] == "increment must be a non-negative integer, got '7'"
    assert reasons[7] == "increment must be a non-negative integer, got True"
    assert reasons[8] == "created_at is not an ISO 8601 timestamp: 'yesterday'"
    assert reasons[9] == "updated_at is not an ISO 8601 timestamp: '2026-13-45T99:00:00Z'"
    assert reasons[10].startswith("went backwards: total 9 is smaller than the 10 already applied")
    assert reasons[11] == "updated_at is in the future"
    # Older than what was applied (in a batch of its own: within one batch the newest version wins).
    older = await push(
        http, [row(project, "task.created", today, 12, updated_at=applied_at - timedelta(seconds=5))]
    )
    assert [entry["index"] for entry in older["rejected"]] == [0]
    assert older["rejected"][0]["reason"].startswith("went backwards: updated_at")
    assert await usage_snapshot(pool) == before


async def test_malformed_bodies_are_400_and_change_nothing(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    before = await usage_snapshot(pool)
    bodies: list[bytes] = [
        b"not json",
        b"[]",
        b'{"metrics": {}}',
        b'{"rows": []}',
        b'{"metrics": [1, 2]}',
        b'{"metrics": [{"tag": "task.created"}, "x"]}',
    ]
    for body in bodies:
        response = await http.post("/v1/metrics", content=body)
        assert response.status_code == 400, body
        assert response.json()["code"] == 400
        assert response.json()["error"] == "bad_request"
    assert (await http.get("/v1/metrics")).status_code == 405
    assert (await http.put("/v1/metrics", json={"metrics": []})).json() == {
        "code": 405,
        "error": "method_not_allowed",
        "msg": "method not allowed on this endpoint",
    }
    assert await usage_snapshot(pool) == before


async def test_over_100000_rows_or_a_huge_body_is_413(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    before = await usage_snapshot(pool)
    too_many = await http.post("/v1/metrics", content=b'{"metrics": [' + b",".join([b"{}"] * 100_001) + b"]}")
    assert too_many.status_code == 413
    assert too_many.json()["msg"] == "100,001 rows exceed the limit of 100,000 rows per push"

    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        # Streamed without a Content-Length: refused once 64 MiB have arrived, not after the lot.
        nonlocal pulled
        chunk = b" " * (1024 * 1024)
        for _ in range(200):
            pulled += 1
            yield chunk

    streamed = await http.post("/v1/metrics", content=endless())
    assert streamed.status_code == 413
    assert streamed.json()["msg"] == "body exceeds 67,108,864 bytes"
    # Reading stopped at the chunk that crossed 64 MiB: the 135 MiB after it were never pulled.
    assert pulled == 65
    assert await usage_snapshot(pool) == before


async def test_a_wrong_token_is_401_and_marked_on_the_span(
    http: httpx.AsyncClient, pool: AsyncConnectionPool, spans: InMemorySpanExporter
) -> None:
    exporter = spans  # taken off the global tracer provider after the test (conftest)
    before = await usage_snapshot(pool)
    try:
        for headers in ({"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": ""}):
            response = await http.post("/v1/metrics", json={"metrics": []}, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"] == "unauthorized"
        ok = await http.post("/v1/metrics", json={"metrics": []})
        assert ok.status_code == 200
    finally:
        exporter.shutdown()
    spans = [span for span in exporter.get_finished_spans() if span.name == "POST /v1/metrics"]
    assert [span.attributes["authenticated"] for span in spans] == [False, False, True]
    assert [span.attributes["http.response.status_code"] for span in spans] == [401, 401, 200]
    assert await usage_snapshot(pool) == before


async def test_quota_check_refuses_writes_of_flagged_projects_only(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool, projects=2)
    flagged, clean = org.project_ids
    today = day_start(utc_now())
    await push(http, [row(flagged, "space.learned", today, 101)])  # free limit 100

    async def check(project: str, path: str, method: str = "POST") -> tuple[int, dict[str, str]]:
        response = await http.get(f"/v1/projects/{project}/quota", params={"path": path, "method": method})
        return response.status_code, response.json()

    exceeded = (403, {"msg": "quota exceeded"})
    ok = (200, {"msg": "ok"})
    # A free org over a limit flags that tag on every project of the org.
    assert await check(flagged, "/api/v1/session/abc/messages") == exceeded
    assert await check(clean, "/api/v1/disk/d1/artifact") == exceeded
    assert await check(flagged, "/api/v1/session/abc/messages", "GET") == ok
    assert await check(flagged, "/api/v1/session/abc") == ok
    assert await check(str(uuid.uuid4()), "/api/v1/session/abc/messages") == ok  # unknown project
    other = await make_org(pool)
    assert await check(other.project_ids[0], "/api/v1/session/abc/messages") == ok
    malformed = await http.get("/v1/projects/nope/quota", params={"path": "/api/v1/session/a/messages"})
    assert malformed.status_code == 400
    assert malformed.json()["msg"] == "project_id must be a UUID, got 'nope'"
    unauthenticated = await http.get(f"/v1/projects/{flagged}/quota", headers={"Authorization": ""})
    assert unauthenticated.status_code == 401
