"""The API describes itself (``GET /openapi.json``, OpenAPI 3.1 from the pydantic models), and
schemathesis fuzzes every operation of the running API (``billing api`` + ``billing worker`` as
subprocesses, a database of their own): no 5xx, every answer matches the document, and afterwards no
stored number came from rejected input."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.sql
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from api.admin import OrgBody, PlanBody
from api.schemas import OPERATIONS
from billing.core.config import Settings
from billing.testing.scratch import fresh_database
from tests.api_client import api_client
from tests.conftest import API_TOKEN
from tests.process_support import Process, billing_process, process_env

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
# Per operation and mode (valid and invalid input); nine operations, so several hundred requests.
MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
NEGATIVE_CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]

# What the run's accepted requests could legitimately store, filled as answers come back.
ACCEPTED_ROWS: set[tuple[str, str]] = set()
ACCEPTED_LIMITS: set[tuple[str, str, int]] = set()
SEEDED_LIMITS: set[tuple[str, str, int]] = set()
CALLS: list[int] = []


async def test_openapi_document_is_generated_from_the_validating_models(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> None:
    async with api_client(settings, pool, client) as http:
        response = await http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    assert schemas["OrgBody"] == OrgBody.model_json_schema()
    limits = schemas["PlanBody"]["properties"]["limits"]
    assert limits == PlanBody.model_json_schema()["properties"]["limits"]
    assert limits["additionalProperties"]["maximum"] == 2**63 - 1
    assert set(document["paths"]) == {
        "/v1/metrics",
        "/v1/projects/{project_id}/quota",
        "/v1/stripe/webhook",
        "/v1/orgs/{org_id}",
        "/v1/orgs/{org_id}/projects/{project_id}",
        "/v1/plans/{plan}",
        "/healthz",
        "/metrics",
        "/openapi.json",
    }
    assert set(document["paths"]["/v1/orgs/{org_id}"]) == {"get", "put"}


@pytest.fixture(scope="module")
def fuzz_database(postgres_admin_url: str) -> Iterator[str]:
    with fresh_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="module")
def fuzz_api(fuzz_database: str, temporal_env: WorkflowEnvironment) -> Iterator[Process]:
    """``billing api`` and ``billing worker`` on a task queue and database of their own."""
    env = process_env(
        fuzz_database,
        temporal_env.client.service_client.config.target_host,
        f"fuzz-{uuid.uuid4().hex[:10]}",
        STRIPE_WEBHOOK_SECRET="whsec_fuzz_0123456789",
    )
    with psycopg.connect(fuzz_database, row_factory=dict_row) as conn:
        SEEDED_LIMITS.update(
            (row["plan"], row["tag"], row["included"])
            for row in conn.execute("SELECT plan, tag, included FROM plan_limits").fetchall()
        )
    with billing_process("worker", env, "worker on task queue"), billing_process("api", env, "API on") as api:
        yield api


def _remember_accepted(case: Any, response: Any) -> None:
    """Record what a 200 answer accepted, so the final check can tell it from rejected input."""
    if response.status_code != 200 or not isinstance(case.body, dict):
        return
    path = case.operation.path
    if path == "/v1/metrics":
        rejected = {entry["index"] for entry in response.json().get("rejected", [])}
        for index, row in enumerate(case.body.get("metrics", [])):
            if index not in rejected and isinstance(row, dict):
                ACCEPTED_ROWS.add((str(row.get("project_id")), str(row.get("tag"))))
    elif path == "/v1/plans/{plan}":
        for tag, value in case.body.get("limits", {}).items():
            ACCEPTED_LIMITS.add((case.path_parameters["plan"], tag, value))


def test_every_operation_answers_within_its_schema(fuzz_api: Process) -> None:
    """Schemathesis cases of every operation of the served document, sent to the running API.

    (schemathesis's pytest plugin does not load under this pytest; its case strategies are driven
    by Hypothesis directly instead, which is what the plugin does.)
    """
    schema = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # Every operation but the document itself, which schemathesis leaves out of a schema loaded from it.
    assert {op.label for op in operations} == {
        f"{op.method.upper()} {op.path}" for op in OPERATIONS if op.path != "/openapi.json"
    }
    for operation in operations:
        _fuzz(operation, GenerationMode.POSITIVE)
        # An operation without parameters or body (GET /healthz) has no invalid input to generate.
        inputs = operation.path_parameters, operation.query, operation.headers, operation.body
        if any(len(group) for group in inputs):
            _fuzz(operation, GenerationMode.NEGATIVE)


def _fuzz(operation: Any, mode: GenerationMode) -> None:
    """Send ``MAX_EXAMPLES`` cases of one operation. Negative cases (input that breaks the schema)
    must still never be a 5xx; their status may be one the document does not list (a 404 for a
    path no route matches, say), so status conformance is checked for positive cases only."""
    checks = CHECKS if mode is GenerationMode.POSITIVE else NEGATIVE_CHECKS

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any) -> None:
        response = case.call(headers=AUTH, timeout=120)
        case.validate_response(response, checks=checks)
        _remember_accepted(case, response)
        CALLS.append(response.status_code)

    call()


def test_no_stored_number_came_from_rejected_input(fuzz_database: str, fuzz_api: Process) -> None:
    """Runs after the fuzzing above (same module, file order): every stored usage number belongs to a
    row some answer accepted, and every plan limit is the seeded one or one an answer accepted."""
    assert len(CALLS) > 50
    with psycopg.connect(fuzz_database, row_factory=dict_row) as conn:
        stored = {
            table: {
                (row["p"], row["tag"])
                for row in conn.execute(
                    psycopg.sql.SQL("SELECT DISTINCT project_id::text AS p, tag FROM {}").format(
                        psycopg.sql.Identifier(table)
                    )
                ).fetchall()
            }
            for table in ("project_usage", "usage_ledger", "counter_checkpoints")
        }
        reports = conn.execute("SELECT count(*) AS n FROM stripe_report_outbox").fetchone()
        limits = {
            (row["plan"], row["tag"], row["included"])
            for row in conn.execute("SELECT plan, tag, included FROM plan_limits").fetchall()
        }
    for table, pairs in stored.items():
        assert pairs <= ACCEPTED_ROWS, table
    assert limits - SEEDED_LIMITS <= ACCEPTED_LIMITS
    # Overage reports come only from applied rows.
    assert reports is not None
    assert reports["n"] == 0 or ACCEPTED_ROWS
    print(
        "statuses:",
        sorted(Counter(CALLS).items()),
        "accepted rows:",
        len(ACCEPTED_ROWS),
        "accepted limits:",
        len(ACCEPTED_LIMITS),
    )
