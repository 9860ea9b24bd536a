"""The quota flag cache (api/quota_cache.py, sql/0016): memory answers only while it provably holds
every flag committed ``QUOTA_CACHE_MAX_AGE_SECONDS`` ago; otherwise, and for a project whose flags are changing, the check
reads the database. An operator's block is enforced when acknowledged even by a cache that lags."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from api.quota_cache import APPLICATION_NAME, QuotaFlagCache
from billing.core.config import QUOTA_CACHE_MAX_AGE_SECONDS
from billing.models.org_billing import OperatorRequest
from billing.orchestration.temporal import operator_update
from tests.api_client import AUTH
from tests.factories import make_org
from tests.webhook_support import harness

WRITE = {"path": "/api/v1/session/s1/messages", "method": "POST"}
FAST_PING = 0.02  # pings more often than in production, so that the tests wait less
GIVE_UP_SECONDS = 30.0  # only a failing test waits this long


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds; fail (naming ``what``) if it never does."""
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def following(cache: QuotaFlagCache) -> AsyncIterator[QuotaFlagCache]:
    """Run the cache until the block ends; yields once it answers from memory."""
    task = asyncio.create_task(cache.run())
    try:
        await until(lambda: cache.fresh, "the cache answers from memory")
        yield cache
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def flag(url: str, *projects: str) -> float:
    """Commit a flag for each project (one statement); the monotonic time the commit returned."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO quota_flags (project_id, tag, organization_id, reason, month)"
            " SELECT p, 'task.created', gen_random_uuid(), 'over_limit', date_trunc('month', now())::date"
            " FROM unnest(%s::uuid[]) AS p",
            [list(projects)],
        )
    return time.monotonic()


async def unflag(url: str, *projects: str) -> float:
    """Commit the removal of every flag of the projects; the monotonic time the commit returned."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("DELETE FROM quota_flags WHERE project_id = ANY (%s::uuid[])", [list(projects)])
    return time.monotonic()


def new_project() -> str:
    return str(uuid.uuid4())


async def settle(cache: QuotaFlagCache, truth: dict[str, bool], committed: float) -> None:
    """Wait until memory answers ``truth`` for every project. Meanwhile, once the last change is
    ``QUOTA_CACHE_MAX_AGE_SECONDS`` old, memory may say "read the database" (None) but never the old answer."""
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while True:
        answers = {project: cache.answer(project) for project in truth}
        if answers == truth:
            return
        if time.monotonic() - committed >= QUOTA_CACHE_MAX_AGE_SECONDS:
            assert all(answers[p] in (None, want) for p, want in truth.items()), (answers, truth)
        assert time.monotonic() < deadline, f"memory never caught up: {answers} != {truth}"
        await asyncio.sleep(0.001)


class LaggingCache(QuotaFlagCache):
    """A cache whose notifications all reach it ``lag`` seconds late (a slow network, a busy process),
    in order, as PostgreSQL delivers them: its pings come back late too, so it may still call itself
    fresh while the flags it answers are ``lag`` seconds old."""

    def __init__(self, url: str, lag: float) -> None:
        super().__init__(url, ping_every=FAST_PING)
        self.lag = lag
        self._late: list[tuple[float, str]] = []

    def _receive(self, payload: str) -> None:
        self._late.append((time.monotonic() + self.lag, payload))
        while self._late and self._late[0][0] <= time.monotonic():
            super()._receive(self._late.pop(0)[1])


async def test_memory_follows_every_committed_change_and_never_answers_older_than_the_bound(
    database_url: str,
) -> None:
    before, later = new_project(), new_project()
    await flag(database_url, before)
    async with following(QuotaFlagCache(database_url, ping_every=FAST_PING)) as cache:
        # The start-up read: flagged before the cache started.
        assert cache.answer(before) is True
        assert cache.answer(later) is False

        for change, flagged in ((flag, True), (unflag, False)):
            committed = await change(database_url, later)
            await settle(cache, {before: True, later: flagged}, committed)
        assert cache.answer(before) is True


async def test_the_triggers_name_exactly_the_projects_whose_flags_come_or_go(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await listener.execute("LISTEN quota_flags")

        async def told() -> list[str]:
            # Our own marker comes after every notification committed before it (commit order).
            await listener.execute("SELECT pg_notify('quota_flags', 'end')")
            payloads = []
            async for note in listener.notifies():
                if note.payload == "end":
                    return payloads
                payloads.append(note.payload)
            raise AssertionError("unreachable")

        many = sorted(new_project() for _ in range(450))
        await flag(database_url, *many)
        payloads = await told()
        # One statement, 450 projects: three notifications of at most 200 (a payload is capped at 8 kB).
        assert [len(p.split(",")) for p in payloads] == [200, 200, 50]
        assert sorted(",".join(payloads).split(",")) == many

        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as writer:
            # A new reason or month changes nobody's answer: nobody is told.
            await writer.execute("UPDATE quota_flags SET reason = 'payment_blocked'")
            assert await told() == []
            # A rolled-back change is never told.
            async with writer.transaction(force_rollback=True):
                await writer.execute("DELETE FROM quota_flags")
            assert await told() == []
            await unflag(database_url, many[7])
            assert await told() == [many[7]]
            await writer.execute("TRUNCATE quota_flags")
            assert await told() == ["*"]


async def test_a_cache_that_hears_nothing_falls_back_to_reads_within_the_bound(database_url: str) -> None:
    project = new_project()
    cache = LaggingCache(database_url, lag=0.0)
    async with following(cache):
        assert cache.answer(project) is False
        cache.lag = 3600.0  # from now on nothing reaches the cache: neither the flag nor its pings
        committed = await flag(database_url, project)
        await asyncio.sleep(max(0.0, committed + QUOTA_CACHE_MAX_AGE_SECONDS - time.monotonic()))
        assert cache.answer(project) is None
        assert not cache.fresh


async def test_a_lost_listener_reads_until_it_reconnects_and_then_knows_what_changed_meanwhile(
    database_url: str,
) -> None:
    project = new_project()
    async with following(QuotaFlagCache(database_url, ping_every=FAST_PING)) as cache:
        assert cache.answer(project) is False
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            cursor = await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND datname = current_database()",
                [APPLICATION_NAME],
            )
            assert [row[0] for row in await cursor.fetchall()] == [True]
        await until(lambda: not cache.fresh, "the cache notices its lost connection")
        assert cache.answer(project) is None
        await flag(database_url, project)  # while it reconnects (a second later)
        await until(lambda: cache.fresh, "the cache reconnects")
        assert cache.answer(project) is True


async def test_the_fast_path_answers_from_memory_and_from_reads_alike(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> None:
    org = await make_org(pool, plan="free", projects=2)
    flagged, clear = org.project_ids
    await flag(database_url, flagged)
    async with harness(database_url, pool, client, worker=False) as h:
        app_cache: QuotaFlagCache = h.app.state.flag_cache

        async def answers() -> list[int]:
            return [
                (await h.http.get(f"/v1/projects/{p}/quota", params=WRITE, headers=AUTH)).status_code
                for p in (flagged, clear)
            ]

        def count(source: str) -> float:
            return REGISTRY.get_sample_value("billing_quota_checks_total", {"source": source}) or 0.0

        reads, memory = count("read"), count("memory")
        assert await answers() == [403, 200]  # the cache is not running: reads
        assert (count("read") - reads, count("memory") - memory) == (2, 0)
        async with following(app_cache):
            reads, memory = count("read"), count("memory")
            assert await answers() == [403, 200]
            assert (count("read") - reads, count("memory") - memory) == (0, 2)


@pytest.mark.parametrize("action", ["block", "unblock"])
async def test_an_operator_change_is_enforced_when_acknowledged_by_a_cache_that_lags(
    database_url: str, pool: AsyncConnectionPool, client: Client, action: str
) -> None:
    org = await make_org(pool, plan="pro", projects=3)
    async with harness(database_url, pool, client) as h:
        if action == "unblock":
            await operator_update(
                h.client,
                h.settings.task_queue,
                org.id,
                "block",
                OperatorRequest(reason="first", request_id="b1"),
            )
        # Every notification reaches this API process late, yet soon enough that it stays fresh: without
        # the acknowledgement's wait its memory would still give the old answer.
        cache = LaggingCache(database_url, lag=0.25)
        h.app.state.flag_cache = cache
        async with following(cache):
            await operator_update(
                h.client,
                h.settings.task_queue,
                org.id,
                action,  # type: ignore[arg-type]
                OperatorRequest(reason="ops", request_id=uuid.uuid4().hex),
            )
            statuses = [
                (await h.http.get(f"/v1/projects/{p}/quota", params=WRITE, headers=AUTH)).status_code
                for p in org.project_ids
            ]
        assert statuses == [403 if action == "block" else 200] * 3


CHANGES = st.lists(st.tuples(st.sampled_from(["flag", "unflag", "truncate"]), st.integers(0, 3)), max_size=8)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(changes=CHANGES)
async def test_any_order_of_changes_leaves_memory_equal_to_the_table(
    database_url: str, changes: list[tuple[str, int]]
) -> None:
    projects = [new_project() for _ in range(4)]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("TRUNCATE quota_flags")
        async with following(QuotaFlagCache(database_url, ping_every=FAST_PING)) as cache:
            truth: set[str] = set()
            for change, index in changes:
                project = projects[index]
                if change == "flag" and project in truth:
                    continue  # already flagged
                if change == "flag":
                    committed = await flag(database_url, project)
                    truth.add(project)
                elif change == "unflag":
                    committed = await unflag(database_url, project)
                    truth.discard(project)
                else:
                    await conn.execute("TRUNCATE quota_flags")
                    committed = time.monotonic()
                    truth.clear()
                await settle(cache, {p: p in truth for p in projects}, committed)


async def test_flags_that_recompute_quota_flags_writes_and_clears_reach_memory(
    database_url: str, pool: AsyncConnectionPool
) -> None:
    # recompute_quota_flags clears flags in a data-modifying CTE of its INSERT: both are told.
    org = await make_org(pool, plan="free", projects=2)

    async def payment_status(status: str) -> float:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(
                "UPDATE organization_billing SET payment_status = %s WHERE organization_id = %s",
                [status, org.id],
            )
            await conn.execute(
                "SELECT recompute_quota_flags(ARRAY[%s]::uuid[], date_trunc('month', now())::date)", [org.id]
            )
        return time.monotonic()

    async with following(QuotaFlagCache(database_url, ping_every=FAST_PING)) as cache:
        for status, flagged in (("blocked", True), ("ok", False)):
            committed = await payment_status(status)
            await settle(cache, dict.fromkeys(org.project_ids, flagged), committed)
