"""The suite's own guarantees: a database per test, a clock the test controls, the delay switch."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from billing.core.clock import current_month, utcnow
from tests.activity_delay import ActivityDelay, activity_delay, delay_interceptors
from tests.conftest import Clock
from tests.factories import fetch_value, make_org


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_starts_with_an_empty_database_of_its_own(
    run: int, pool: AsyncConnectionPool, database_url: str, template_database_url: str
) -> None:
    # Run twice: the second run would see the first's org in a shared database.
    assert database_url != template_database_url
    assert await fetch_value(pool, "SELECT count(*) FROM organizations") == 0
    assert await fetch_value(pool, "SELECT count(*) FROM plan_limits") > 0  # migrated, seeded
    await make_org(pool)
    await make_org(pool)
    assert await fetch_value(pool, "SELECT count(*) FROM organizations") == 2


async def test_the_clock_moves_sql_and_python_for_this_test_only(
    clock: Clock, pool: AsyncConnectionPool, database_url: str
) -> None:
    moment = datetime(2031, 1, 31, 23, 59, 59, tzinfo=UTC)
    await clock.set(moment)
    assert utcnow() == moment
    assert current_month() == "2031-01"
    # The test's pool (connections opened before the clock moved) and any new connection, as a
    # worker or CLI process would open, read the same SQL clock.
    assert await fetch_value(pool, "SELECT billing_now()") == moment
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT billing_now(), now() <> billing_now()").fetchone()
    assert row == (moment, True)
    later = await clock.set(datetime(2031, 2, 1, 0, 0, 1, tzinfo=UTC))
    assert (await fetch_value(pool, "SELECT billing_now()"), current_month()) == (later, "2031-02")
    clock.release()
    assert utcnow() != later


async def test_freeze_pins_the_present(clock: Clock, pool: AsyncConnectionPool) -> None:
    before = datetime.now(UTC)
    pinned = await clock.freeze()
    assert before <= pinned <= datetime.now(UTC)
    assert utcnow() == pinned
    assert await fetch_value(pool, "SELECT billing_now()") == pinned


def test_the_activity_delay_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BILLING_TEST_ACTIVITY_DELAY", raising=False)
    assert (activity_delay(), delay_interceptors()) == (0.0, [])
    monkeypatch.setenv("BILLING_TEST_ACTIVITY_DELAY", "0.3")
    [interceptor] = delay_interceptors()
    assert isinstance(interceptor, ActivityDelay) and interceptor.seconds == 0.3
    for bad, says in (("soon", "must be a number of seconds, got 'soon'"), ("-1", "must not be negative")):
        monkeypatch.setenv("BILLING_TEST_ACTIVITY_DELAY", bad)
        with pytest.raises(ValueError, match=says):
            activity_delay()
