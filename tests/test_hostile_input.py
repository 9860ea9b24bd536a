"""Issue 12: hostile input to the real app (create_app over ASGI) gets a clear 4xx and changes nothing.

One test per finding in the input area: unbounded bodies (1), unbounded metric labels (2), 500s from
input (4), coerced numbers (5), unbounded strings and future webhook timestamps (6). The memory of a
real server process is measured in tests/test_api_process.py.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from api.telemetry_middleware import STANDARD_METHODS
from api.validation import MAX_ADMIN_BODY_BYTES
from api.webhooks import MAX_BODY_BYTES as WEBHOOK_MAX_BODY_BYTES
from billing.core.config import Settings
from billing.testing.stripe_server import sign_payload
from tests.api_client import AUTH, api_client
from tests.conftest import make_settings
from tests.factories import fetch_value, make_org
from tests.usage_support import day_start, http, push, row, utc_now
from tests.webhook_support import WEBHOOK_SECRET

__all__ = ["http"]

CHUNK = 64 * 1024


class CountingBody:
    """A chunked request body that counts how many chunks the server pulled from it."""

    def __init__(self, total_bytes: int, prefix: bytes = b"") -> None:
        self.total_bytes = total_bytes
        self.prefix = prefix
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        first = True
        while sent < self.total_bytes:
            self.pulled += 1
            chunk = self.prefix if first and self.prefix else b"[" * CHUNK
            first = False
            sent += len(chunk)
            yield chunk


@pytest.fixture
async def webhook_http(
    database_url: str, pool: AsyncConnectionPool, client: Client
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with STRIPE_WEBHOOK_SECRET set, no worker (nothing here reaches Temporal)."""
    settings = make_settings(database_url, client, STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
    async with api_client(settings, pool, client) as http_client:
        yield http_client


async def _plan_limits(pool: AsyncConnectionPool) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=None)  # type: ignore[call-overload]
        await cursor.execute("SELECT plan, tag, included FROM plan_limits ORDER BY plan, tag")
        return await cursor.fetchall()


# --- finding 1: bounded reading ----------------------------------------------------------------------


async def test_webhook_without_signature_is_400_before_reading_the_body(
    webhook_http: httpx.AsyncClient,
) -> None:
    body = CountingBody(300 * 1024 * 1024)
    response = await webhook_http.post("/v1/stripe/webhook", content=body)
    assert (response.status_code, response.json()) == (
        400,
        {"code": 400, "error": "bad_request", "msg": "missing Stripe-Signature header"},
    )
    # httpx's ASGI transport pulls a chunk only when the app asks for one: the app asked for none.
    assert body.pulled == 0


async def test_webhook_body_over_the_limit_is_413_without_reading_the_rest(
    webhook_http: httpx.AsyncClient,
) -> None:
    body = CountingBody(300 * 1024 * 1024)
    response = await webhook_http.post(
        "/v1/stripe/webhook", content=body, headers={"Stripe-Signature": "t=1,v1=00"}
    )
    assert (response.status_code, response.json()) == (
        413,
        {"code": 413, "error": "payload_too_large", "msg": "body exceeds 1,048,576 bytes"},
    )
    assert body.pulled == WEBHOOK_MAX_BODY_BYTES // CHUNK + 1


@pytest.mark.parametrize("path", ["/v1/orgs/{org}", "/v1/orgs/{org}/projects/{project}", "/v1/plans/free"])
async def test_admin_body_over_the_limit_is_413_without_reading_the_rest(
    settings: Settings, pool: AsyncConnectionPool, client: Client, path: str
) -> None:
    org_id, project_id = str(uuid.uuid4()), str(uuid.uuid4())
    limits_before = await _plan_limits(pool)
    body = CountingBody(200 * 1024 * 1024)
    async with api_client(settings, pool, client) as http_client:
        response = await http_client.put(
            path.format(org=org_id, project=project_id), content=body, headers=AUTH
        )
        declared = await http_client.put(
            path.format(org=org_id, project=project_id),
            content=b"{}",
            headers={**AUTH, "Content-Length": str(300 * 1024 * 1024)},
        )
    assert (response.status_code, response.json()["msg"]) == (413, "body exceeds 65,536 bytes")
    assert body.pulled == MAX_ADMIN_BODY_BYTES // CHUNK + 1
    assert (declared.status_code, declared.json()["msg"]) == (
        413,
        "body of 314,572,800 bytes exceeds 65,536 bytes",
    )
    assert await fetch_value(pool, "SELECT count(*) FROM organizations WHERE id = %s", [org_id]) == 0
    assert await _plan_limits(pool) == limits_before


# --- finding 2: bounded metric labels -----------------------------------------------------------------


async def test_metric_labels_come_from_closed_sets(
    settings: Settings, pool: AsyncConnectionPool, client: Client
) -> None:
    async with api_client(settings, pool, client) as http_client:
        for index in range(30):
            await http_client.request(f"MADEUP{index}", "/healthz")
            await http_client.request("X" * 8192, f"/v1/orgs/{uuid.uuid4()}")
            await http_client.get(f"/no/such/path/{index}")
        wrong_method = await http_client.post(f"/v1/orgs/{uuid.uuid4()}", headers=AUTH)
        text = (await http_client.get("/metrics")).text
    assert wrong_method.status_code == 405
    assert "MADEUP" not in text
    assert "XXXX" not in text
    assert "/no/such/path" not in text
    labels = {
        (sample.labels["method"], sample.labels["route"], sample.labels["status"])
        for family in text_string_to_metric_families(text)
        if family.name == "billing_http_requests"
        for sample in family.samples
        if sample.name == "billing_http_requests_total"
    }
    assert ("other", "/healthz", "405") in labels
    assert ("other", "/v1/orgs/{org_id}", "405") in labels
    assert ("GET", "unmatched", "404") in labels
    assert ("POST", "/v1/orgs/{org_id}", "405") in labels
    routes = {
        "unmatched",
        "/healthz",
        "/metrics",
        "/v1/orgs/{org_id}",
        "/v1/orgs/{org_id}/projects/{project_id}",
        "/v1/plans/{plan}",
        "/v1/metrics",
        "/v1/projects/{project_id}/quota",
        "/v1/stripe/webhook",
        "/openapi.json",
    }
    # Other tests of the session count requests in the same registry: any standard method may appear.
    assert {method for method, _, _ in labels} <= STANDARD_METHODS | {"other"}
    assert {route for _, route, _ in labels} <= routes


# --- findings 4 and 5: strict types, column ranges, control characters, nesting -----------------------


@pytest.mark.parametrize(
    ("value", "msg"),
    [
        (True, "limits.task.created: Input should be a valid integer"),
        ("1000", "limits.task.created: Input should be a valid integer"),
        (1000.0, "limits.task.created: Input should be a valid integer"),
        (2**63, "limits.task.created: Input should be less than or equal to 9223372036854775807"),
        (10**30, "limits.task.created: Input should be less than or equal to 9223372036854775807"),
        (-(2**70), "limits.task.created: Input should be greater than or equal to -9223372036854775808"),
    ],
)
async def test_plan_limits_take_json_integers_in_the_bigint_range_only(
    settings: Settings, pool: AsyncConnectionPool, client: Client, value: object, msg: str
) -> None:
    before = await _plan_limits(pool)
    async with api_client(settings, pool, client) as http_client:
        response = await http_client.put(
            "/v1/plans/free", content=json.dumps({"limits": {"task.created": value}}), headers=AUTH
        )
    assert (response.status_code, response.json()) == (
        400,
        {"code": 400, "error": "bad_request", "msg": msg},
    )
    assert await _plan_limits(pool) == before


@pytest.mark.parametrize(
    ("path", "body", "msg"),
    [
        ("/v1/orgs/{org}", {"name": "Acme\x00"}, "name: must not contain control characters (found U+0000)"),
        ("/v1/orgs/{org}", {"name": "A\x1b[31m"}, "name: must not contain control characters (found U+001B)"),
        ("/v1/orgs/{org}", {"name": "x" * 201}, "name: String should have at most 200 characters"),
        ("/v1/orgs/{org}", {"name": 5}, "name: Input should be a valid string"),
        (
            "/v1/orgs/{org}",
            {"stripe_customer_id": "cus_" + "a" * 300},
            "stripe_customer_id: String should have at most 255 characters",
        ),
        (
            "/v1/orgs/{org}",
            {"name": "Acme \ud800"},
            "name: Input should be a valid string, unable to parse raw data as a unicode string",
        ),
        (
            "/v1/orgs/{org}/projects/{project}",
            {"name": "web\x00"},
            "name: must not contain control characters (found U+0000)",
        ),
        (
            "/v1/plans/free",
            {"limits": {"task.\x00created": 1}},
            "limits.'task.\\x00created'.[key]: must not contain control characters (found U+0000)",
        ),
        (
            "/v1/plans/free",
            {"limits": {"t" * 300: 1}},
            "limits.tttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttt....[key]: String should have at most 200 characters",
        ),
    ],
)
async def test_text_fields_are_bounded_and_refuse_control_characters(
    settings: Settings, pool: AsyncConnectionPool, client: Client, path: str, body: dict[str, Any], msg: str
) -> None:
    org = await make_org(pool)
    limits_before = await _plan_limits(pool)
    names_before = await fetch_value(pool, "SELECT name FROM organizations WHERE id = %s", [org.id])
    async with api_client(settings, pool, client) as http_client:
        response = await http_client.put(
            # ASCII JSON: a lone surrogate travels as the escape "\ud800", the way a client sends it.
            path.format(org=org.id, project=uuid.uuid4()),
            content=json.dumps(body),
            headers=AUTH,
        )
    assert (response.status_code, response.json()) == (
        400,
        {"code": 400, "error": "bad_request", "msg": msg},
    )
    assert await fetch_value(pool, "SELECT name FROM organizations WHERE id = %s", [org.id]) == names_before
    assert await _plan_limits(pool) == limits_before


@pytest.mark.parametrize(
    ("path", "depth"),
    [
        (path, depth)
        for path in ("/v1/orgs/{org}", "/v1/orgs/{org}/projects/{project}", "/v1/plans/free", "/v1/metrics")
        for depth in (33, 30_000)  # 30,000 levels stay under the admin body limit
    ]
    + [("/v1/metrics", 100_000)],
)
async def test_deeply_nested_json_is_400(
    settings: Settings, pool: AsyncConnectionPool, client: Client, path: str, depth: int
) -> None:
    body = b"[" * depth + b"]" * depth
    org_id = str(uuid.uuid4())
    async with api_client(settings, pool, client) as http_client:
        method = "POST" if path == "/v1/metrics" else "PUT"
        response = await http_client.request(
            method, path.format(org=org_id, project=uuid.uuid4()), content=body, headers=AUTH
        )
    assert (response.status_code, response.json()) == (
        400,
        {"code": 400, "error": "bad_request", "msg": "body nests JSON deeper than 32 levels"},
    )


@pytest.mark.parametrize("path", ["/v1/plans/free", "/v1/metrics", "/v1/orgs/{org}"])
async def test_a_number_of_thousands_of_digits_is_400(
    settings: Settings, pool: AsyncConnectionPool, client: Client, path: str
) -> None:
    huge = "9" * 5000
    body = {
        "/v1/plans/free": '{"limits": {"task.created": %s}}',
        "/v1/metrics": '{"metrics": [{"increment": %s}]}',
        "/v1/orgs/{org}": '{"name": %s}',
    }[path] % huge
    before = await _plan_limits(pool)
    async with api_client(settings, pool, client) as http_client:
        method = "POST" if path == "/v1/metrics" else "PUT"
        response = await http_client.request(
            method, path.format(org=uuid.uuid4()), content=body.encode(), headers=AUTH
        )
    assert (response.status_code, response.json()) == (
        400,
        {"code": 400, "error": "bad_request", "msg": "body holds a number too large to be read"},
    )
    assert await _plan_limits(pool) == before


async def test_deeply_nested_signed_webhook_is_400(webhook_http: httpx.AsyncClient) -> None:
    body = b'{"id": "evt_deep", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = await webhook_http.post(
        "/v1/stripe/webhook", content=body, headers={"Stripe-Signature": sign_payload(body, WEBHOOK_SECRET)}
    )
    assert (response.status_code, response.json()["msg"]) == (400, "body nests JSON deeper than 32 levels")


async def test_push_rows_with_control_characters_or_huge_tags_are_rejected_entries(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    org = await make_org(pool)
    project = org.project_ids[0]
    today = day_start(utc_now())
    good = row(project, "task.created", today, 5)
    rows = [
        {**good, "tag": "task.created\x00"},
        {**good, "tag": "t" * (20 * 1024 * 1024)},
        {**good, "project_id": "p" * 1_000_000},
        {**good, "tag": "task.\udc00created"},
        good,
    ]
    response = await http.post("/v1/metrics", content=json.dumps({"metrics": rows}))
    assert response.status_code == 200, response.text[:500]
    # The 20 MB tag is not echoed back: the whole answer stays small.
    assert len(response.content) < 2000
    answer = response.json()
    assert answer["rejected"] == [
        {"index": 0, "reason": "tag must not contain control characters (found U+0000): 'task.created\\x00'"},
        {"index": 1, "reason": "tag is longer than 200 characters: '" + "t" * 76 + "..."},
        {"index": 2, "reason": "project_id is not a UUID: '" + "p" * 76 + "..."},
        {
            "index": 3,
            "reason": "tag must be valid Unicode (found a lone surrogate U+DC00): 'task.\\udc00created'",
        },
    ]
    # Only the good row is staged and applied.
    batch_rows = await fetch_value(
        pool, "SELECT count(*) FROM usage_batch_rows WHERE project_id = %s", [project]
    )
    assert batch_rows == 1
    assert (
        await fetch_value(pool, "SELECT sum(value) FROM project_usage WHERE project_id = %s", [project]) == 5
    )


# --- finding 6: webhook timestamps in the future --------------------------------------------------------


@pytest.mark.parametrize(("offset", "accepted"), [(86_400, False), (301, False), (-301, False), (0, True)])
async def test_webhook_timestamps_outside_the_tolerance_either_way_are_refused(
    webhook_http: httpx.AsyncClient, pool: AsyncConnectionPool, offset: int, accepted: bool
) -> None:
    event_id = f"evt_{uuid.uuid4().hex}"
    body = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "charge.refunded",
            "created": 1,
            "data": {"object": {"id": "ch_1", "object": "charge"}},
        }
    ).encode()
    stamp = int(time.time()) + offset
    response = await webhook_http.post(
        "/v1/stripe/webhook",
        content=body,
        headers={"Stripe-Signature": sign_payload(body, WEBHOOK_SECRET, stamp)},
    )
    if accepted:
        assert response.status_code == 200, response.text
        return
    msg = f"bad Stripe-Signature: Timestamp outside the tolerance zone ({stamp})"
    if offset > 0:
        msg += f": {offset} s in the future"
    assert response.status_code == 400
    # The future offset is measured against the clock a moment later: allow the second it may take.
    assert response.json()["msg"] in {msg, msg.replace(f"{offset} s", f"{offset - 1} s")}
    assert (
        await fetch_value(pool, "SELECT count(*) FROM stripe_webhook_events WHERE event_id = %s", [event_id])
        == 0
    )


async def test_push_answer_is_unchanged_for_good_rows(
    http: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    """The bounded reader still reads a normal push whole (a body of many chunks)."""
    org = await make_org(pool)
    today = day_start(utc_now())
    rows = [row(org.project_ids[0], "task.created", today, 7)]
    answer = await push(http, rows)
    assert answer["rejected"] == []
