"""Hypothesis against the running push (``billing api`` + ``billing worker`` subprocesses, a database of
their own): any generated body is either refused whole (4xx, nothing stored changes) or answered 200,
in which case exactly the valid rows are applied, with the growth a reference model predicts, and every
rejected row changes nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from temporalio.testing import WorkflowEnvironment

from billing.testing.scratch import fresh_database
from tests.conftest import API_TOKEN
from tests.process_support import Process, billing_process, process_env

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
COUNTERS = ["task.created", "space.learned", "search.experience.embedding", "search.experience.agentic"]
MAX_EXAMPLES = 40


class World:
    """The running API, its database, and the org and projects the pushes are about."""

    def __init__(self, api: Process, database_url: str, projects: list[str]) -> None:
        self.api = api
        self.database_url = database_url
        self.projects = projects
        self.http = httpx.Client(base_url=api.base_url, headers=AUTH, timeout=120)
        self.day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        self.pushes = 0
        self.applied = 0
        self.rejected = 0

    def checkpoints(self) -> dict[tuple[str, str], int]:
        """Applied total of each (project, tag) row of today (the only day the valid rows use)."""
        with psycopg.connect(self.database_url, row_factory=dict_row) as conn:
            rows = conn.execute(
                "SELECT project_id::text AS p, tag, applied_total FROM counter_checkpoints"
                " WHERE row_created_at = %s",
                [self.day],
            ).fetchall()
        return {(row["p"], row["tag"]): row["applied_total"] for row in rows}

    def usage(self) -> dict[str, Any]:
        """Every stored number a push may change."""
        with psycopg.connect(self.database_url, row_factory=dict_row) as conn:
            return {
                "project_usage": {
                    (row["p"], row["tag"], row["month"]): row["value"]
                    for row in conn.execute(
                        "SELECT project_id::text AS p, tag, month, value FROM project_usage"
                    ).fetchall()
                },
                "org_usage": conn.execute(
                    "SELECT organization_id, tag, month, value FROM org_usage ORDER BY 1, 2, 3"
                ).fetchall(),
                "checkpoints": conn.execute(
                    "SELECT project_id, tag, row_created_at, applied_total, row_updated_at"
                    " FROM counter_checkpoints ORDER BY 1, 2, 3"
                ).fetchall(),
            }


@pytest.fixture(scope="module")
def world(postgres_admin_url: str, temporal_env: WorkflowEnvironment) -> Iterator[World]:
    with fresh_database(postgres_admin_url) as url:
        env = process_env(
            url, temporal_env.client.service_client.config.target_host, f"prop-{uuid.uuid4().hex[:10]}"
        )
        with (
            billing_process("worker", env, "worker on task queue"),
            billing_process("api", env, "API on") as api,
        ):
            org_id = str(uuid.uuid4())
            projects = [str(uuid.uuid4()), str(uuid.uuid4())]
            with httpx.Client(base_url=api.base_url, headers=AUTH, timeout=60) as http:
                assert http.put(f"/v1/orgs/{org_id}", json={"plan": "team"}).status_code == 200
                for project in projects:
                    assert http.put(f"/v1/orgs/{org_id}/projects/{project}", json={}).status_code == 200
            world = World(api, url, projects)
            yield world
            world.http.close()


GARBAGE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
BAD_TAGS = st.one_of(
    st.sampled_from(
        ["", "tasks.made", "task.created\x00", "task.\x1bcreated", "t" * 201, "storage", "task.\ud800created"]
    ),
    GARBAGE_VALUES.filter(lambda value: not isinstance(value, str)),
)


@st.composite
def push_rows(
    draw: st.DrawFn, world: World, checkpoints: dict[tuple[str, str], int], seq: int
) -> tuple[list[Any], set[int], set[int]]:
    """Rows of one push: (rows, indexes that must apply, indexes that must be rejected).

    Valid rows: a known project, a counter tag, today's row, growing totals (one row per key, so the
    newest-wins rule within a push never comes into play). Invalid rows: each breaks one rule.
    """
    keys = draw(
        st.lists(
            st.tuples(st.sampled_from(world.projects), st.sampled_from(COUNTERS)), unique=True, max_size=5
        )
    )
    rows: list[Any] = []
    must_apply: set[int] = set()
    must_reject: set[int] = set()
    created = world.day.isoformat()
    # Seconds after midnight grow with every push, so a valid row is always newer than the last one
    # applied; at most a few minutes ahead of now just after midnight, inside the allowed skew.
    updated = (world.day + timedelta(seconds=seq + 1)).isoformat()
    for project, tag in keys:
        before = checkpoints.get((project, tag), 0)
        delta = draw(st.integers(min_value=-3, max_value=1000))
        row = {
            "project_id": project,
            "tag": tag,
            "created_at": created,
            "updated_at": updated,
            "increment": before + delta,
        }
        if delta < 0:  # went backwards (or negative): rejected
            must_reject.add(len(rows))
        elif delta > 0:  # grew: applied (an unchanged total may go either way)
            must_apply.add(len(rows))
        rows.append(row)
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        project, tag = draw(st.sampled_from(world.projects)), draw(st.sampled_from(COUNTERS))
        good = {
            "project_id": project,
            "tag": tag,
            "created_at": created,
            "updated_at": updated,
            "increment": 5,
        }
        broken = draw(
            st.sampled_from(
                ["project_id", "unknown_project", "tag", "created_at", "updated_at", "increment", "missing"]
            )
        )
        if broken == "unknown_project":
            good["project_id"] = str(uuid.uuid4())
        elif broken == "tag":
            good["tag"] = draw(BAD_TAGS)
        elif broken == "increment":
            good["increment"] = draw(
                st.one_of(
                    st.integers(max_value=-1),
                    st.integers(min_value=2**63),
                    st.booleans(),
                    st.floats(),
                    st.text(max_size=5),
                    st.none(),
                )
            )
        elif broken == "missing":
            del good[draw(st.sampled_from(sorted(good)))]
        else:
            good[broken] = draw(
                GARBAGE_VALUES.filter(lambda value: not isinstance(value, str) or value == "")
            )
        must_reject.add(len(rows))
        rows.append(good)
    return rows, must_apply, must_reject


def _nonzero(values: dict[Any, int]) -> dict[Any, int]:
    return {key: value for key, value in values.items() if value}


REFUSED_BODIES = st.one_of(
    st.just(b"not json"),
    st.just(b"[" * 50 + b"]" * 50),
    st.just(b'{"metrics": {}}'),
    st.just(b'{"metrics": [1, 2]}'),
    st.just(b'{"rows": []}'),
    st.binary(max_size=50),
)


def test_any_push_is_refused_or_applied_and_rejected_rows_change_nothing(world: World) -> None:
    @given(data=st.data())
    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def push(data: st.DataObject) -> None:
        world.pushes += 1
        before = world.usage()
        if data.draw(st.integers(min_value=0, max_value=5)) == 0:
            body = data.draw(REFUSED_BODIES)
            response = world.http.post("/v1/metrics", content=body)
            assert 400 <= response.status_code < 500, response.text
            assert world.usage() == before
            return
        checkpoints = world.checkpoints()
        rows, must_apply, must_reject = data.draw(push_rows(world, checkpoints, world.pushes))
        # ASCII JSON, so a lone surrogate travels as its escape, as a real client would send it.
        response = world.http.post("/v1/metrics", content=json.dumps({"metrics": rows}))
        assert response.status_code == 200, response.text
        rejected = {entry["index"] for entry in response.json()["rejected"]}
        assert must_reject <= rejected
        assert not (must_apply & rejected)
        world.applied += len(must_apply)
        world.rejected += len(rejected)
        # The model: each applied row grows its (project, tag) usage by its total minus the total
        # already applied for that row; nothing else moves.
        expected = dict(before["project_usage"])
        month = world.day.date().replace(day=1)
        for index, row in enumerate(rows):
            if index in rejected:
                continue
            key = (row["project_id"], row["tag"], month)
            growth = row["increment"] - checkpoints.get((row["project_id"], row["tag"]), 0)
            expected[key] = expected.get(key, 0) + growth
        after = world.usage()
        assert _nonzero(after["project_usage"]) == _nonzero(expected)
        if not (set(range(len(rows))) - rejected):
            assert after == before

    push()
    # The run exercised both sides (not a vacuous pass).
    assert world.applied > 0
    assert world.rejected > 0
    print(f"pushes {world.pushes}, rows applied {world.applied}, rejected {world.rejected}")
