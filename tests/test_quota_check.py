"""The gateway's quota check: the fast path answers as the framework does, and never from a stale read."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from api.quota import FlagLookup
from billing.core.config import Settings
from billing.observability.telemetry import tracer_provider
from tests.api_client import AUTH, api_client
from tests.factories import make_org

MESSAGES = "/api/v1/session/s1/messages"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def _flag(pool: AsyncConnectionPool, org_id: str, project_id: str) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO quota_flags (project_id, tag, organization_id, reason, month)"
            " VALUES (%s, 'task.created', %s, 'payment_blocked', date_trunc('month', billing_now())::date)",
            [project_id, org_id],
        )


def _check(project_id: str, method: str = "POST", path: str = MESSAGES) -> str:
    return f"/v1/projects/{project_id}/quota?path={path}&method={method}"


async def test_answers_of_the_fast_path_and_of_the_framework_are_the_contract(
    settings: Settings, pool: AsyncConnectionPool, client: Client, spans: InMemorySpanExporter
) -> None:
    org = await make_org(pool, projects=2)
    flagged, clear = org.project_ids
    await _flag(pool, org.id, flagged)
    spans.clear()
    async with api_client(settings, pool, client) as http:
        refused = await http.get(_check(flagged), headers=AUTH)
        artifact = await http.get(_check(flagged, path="/api/v1/disk/d1/artifact"), headers=AUTH)
        lower = await http.get(_check(flagged, method="post"), headers=AUTH)
        read = await http.get(_check(flagged, method="GET"), headers=AUTH)
        other_path = await http.get(_check(flagged, path="/api/v1/session/s1"), headers=AUTH)
        allowed = await http.get(_check(clear), headers=AUTH)
        unknown = await http.get(_check(str(uuid.uuid4())), headers=AUTH)
        no_params = await http.get(f"/v1/projects/{flagged}/quota", headers=AUTH)
        # Not the fast path's: the framework answers them, as before.
        wrong = await http.get(_check(flagged), headers={"Authorization": "Bearer nope"})
        lowercase_scheme = await http.get(
            _check(flagged), headers={"Authorization": AUTH["Authorization"].replace("Bearer", "bearer")}
        )
        malformed = await http.get(_check("not-a-uuid"), headers=AUTH)
        uppercase_id = await http.get(_check(flagged.upper()), headers=AUTH)
    assert (refused.status_code, refused.json()) == (403, {"msg": "quota exceeded"})
    assert refused.headers["content-type"] == "application/json"
    assert (artifact.status_code, lower.status_code) == (403, 403)
    assert (read.status_code, other_path.status_code, no_params.status_code) == (200, 200, 200)
    assert (allowed.status_code, allowed.json()) == (200, {"msg": "ok"})
    assert unknown.status_code == 200
    assert (wrong.status_code, wrong.json()["error"]) == (401, "unauthorized")
    assert lowercase_scheme.status_code == 403
    assert (malformed.status_code, malformed.json()["error"]) == (400, "bad_request")
    assert uppercase_id.status_code == 403
    finished = spans.get_finished_spans()
    assert {span.name for span in finished} == {"GET /v1/projects/{project_id}/quota"}
    assert [span.attributes.get("authenticated") for span in finished] == [
        True, True, True, True, True, True, True, True, False, True, True, True,
    ]  # fmt: skip
    assert [span.attributes.get("http.response.status_code") for span in finished] == [
        403, 403, 403, 200, 200, 200, 200, 200, 401, 403, 400, 403,
    ]  # fmt: skip


async def test_a_flag_committed_before_a_check_arrives_is_enforced_by_that_check(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> None:
    """What an operator block relies on: committed, then the very next check answers 403."""
    org = await make_org(pool, projects=3)
    async with api_client(settings, pool, client) as http:
        for _ in range(20):
            before = await asyncio.gather(*(http.get(_check(p), headers=AUTH) for p in org.project_ids))
            assert [r.status_code for r in before] == [200, 200, 200]
            for project_id in org.project_ids:
                await _flag(pool, org.id, project_id)
            after = await asyncio.gather(*(http.get(_check(p), headers=AUTH) for p in org.project_ids))
            assert [r.status_code for r in after] == [403, 403, 403]
            async with pool.connection() as conn:
                await conn.execute("DELETE FROM quota_flags WHERE organization_id = %s", [org.id])


class _GatedLookup(FlagLookup):
    """The first read is held after it ran (its answer already fixed) until the test opens the gate."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        super().__init__(pool)
        self.first_read_done = asyncio.Event()
        self.gate = asyncio.Event()
        self.reads: list[list[str]] = []

    async def _read(self, project_ids: list[str]) -> set[str]:
        flagged = await super()._read(project_ids)
        self.reads.append(project_ids)
        if len(self.reads) == 1:
            self.first_read_done.set()
            await self.gate.wait()
        return flagged


async def test_a_check_arriving_during_a_read_waits_for_a_read_of_its_own(pool: AsyncConnectionPool) -> None:
    """A check is never answered by a read that began before it: that read may predate a flag's commit.

    Forced: the first read ran (no flag), a flag is committed, then a second check arrives while the
    first read is still in flight. Sharing that read's answer would say 200 after the commit.
    (Also the case of one read at a time: the second check then waits for the first to finish.)
    """
    org = await make_org(pool, projects=1)
    (project_id,) = org.project_ids
    lookup = _GatedLookup(pool)
    first = asyncio.create_task(lookup.flagged(project_id))
    await asyncio.wait_for(lookup.first_read_done.wait(), 10)
    await _flag(pool, org.id, project_id)
    # The second check gets a read of its own, answered while the first read is still held.
    assert await asyncio.wait_for(lookup.flagged(project_id), 10) is True
    assert not first.done()
    lookup.gate.set()
    assert await first is False
    assert lookup.reads == [[project_id], [project_id]]


async def test_concurrent_checks_share_one_read(pool: AsyncConnectionPool) -> None:
    org = await make_org(pool, projects=4)
    await _flag(pool, org.id, org.project_ids[0])
    lookup = _GatedLookup(pool)
    lookup.gate.set()
    answers = await asyncio.gather(*(lookup.flagged(p) for p in [*org.project_ids, org.project_ids[0]]))
    assert answers == [True, False, False, False, True]
    assert lookup.reads == [org.project_ids]


async def test_a_failed_read_fails_its_checks_and_the_next_check_reads_again(database_url: str) -> None:
    from billing.db.pool import open_pool

    doomed = await open_pool(database_url, max_size=1)
    await doomed.close()
    lookup = FlagLookup(doomed)
    with pytest.raises(Exception):  # noqa: B017 - whatever the closed pool raises
        await lookup.flagged(str(uuid.uuid4()))
    with pytest.raises(Exception):  # noqa: B017
        await lookup.flagged(str(uuid.uuid4()))
    # Nothing is left waiting or reading after the failures (once the read's done callback ran).
    await asyncio.sleep(0.01)
    assert (lookup._waiting, lookup._reads) == ({}, set())


async def test_a_check_when_the_database_is_gone_is_answered_by_the_framework_as_before(
    settings: Settings, client: Client, database_url: str, spans: InMemorySpanExporter
) -> None:
    """The fast path adds no failure mode: a failed read goes down the normal stack (its error shape)."""
    import httpx

    from api.app import create_app
    from billing.db.pool import open_pool

    doomed = await open_pool(database_url, max_size=1)
    await doomed.close()
    spans.clear()
    transport = httpx.ASGITransport(app=create_app(settings, doomed, client), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
        answer = await http.get(_check(str(uuid.uuid4())), headers=AUTH)
    assert (answer.status_code, answer.json()["error"]) == (500, "internal_error")
    assert len(spans.get_finished_spans()) == 1


async def test_with_one_read_at_a_time_a_later_check_waits_for_a_read_begun_after_it(
    pool: AsyncConnectionPool,
) -> None:
    org = await make_org(pool, projects=1)
    (project_id,) = org.project_ids
    lookup = _GatedLookup(pool)
    lookup._max_reads = 1
    first = asyncio.create_task(lookup.flagged(project_id))
    await asyncio.wait_for(lookup.first_read_done.wait(), 10)
    await _flag(pool, org.id, project_id)
    second = asyncio.create_task(lookup.flagged(project_id))
    await asyncio.sleep(0.05)
    assert not second.done()
    lookup.gate.set()
    assert (await first, await second) == (False, True)
    assert lookup.reads == [[project_id], [project_id]]
