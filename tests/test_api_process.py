"""Issue 12 against the API as a real process (``billing api`` under uvicorn, ``billing worker``):
memory of a server fed hundreds of MB (finding 1), and stopping with requests in flight (finding 3's
SIGTERM part). The server's memory is read from /proc: it must grow by less than 50 MB."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import httpx
import psycopg
import pytest
from temporalio.testing import WorkflowEnvironment

from billing.core.config import QUOTA_CACHE_MAX_AGE_SECONDS
from billing.testing.scratch import fresh_database
from billing.testing.stripe_server import sign_payload
from tests.conftest import API_TOKEN
from tests.process_support import (
    PeakSampler,
    Process,
    RawAnswer,
    billing_process,
    process_env,
    stream_request,
)

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
WEBHOOK_SECRET = "whsec_process_test_0123456789"
MB = 1024 * 1024
GROWTH_LIMIT_KB = 50 * 1024
CHUNK = b"x" * 65536
WRITE = {"path": "/api/v1/session/s1/messages", "method": "POST"}


@pytest.fixture(scope="module")
def process_database(postgres_admin_url: str) -> Iterator[str]:
    """A database of these processes' own: what they store never meets the other tests."""
    with fresh_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="module")
def api_env(process_database: str, temporal_env: WorkflowEnvironment) -> dict[str, str]:
    return process_env(
        process_database,
        temporal_env.client.service_client.config.target_host,
        f"proc-{uuid.uuid4().hex[:10]}",
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
    )


@pytest.fixture(scope="module")
def api(api_env: dict[str, str]) -> Iterator[Process]:
    """``billing api`` with STRIPE_WEBHOOK_SECRET, warmed up (every endpoint answered once)."""
    with billing_process("api", api_env, "API on") as process:
        with httpx.Client(base_url=process.base_url, timeout=30) as http:
            http.get("/healthz")
            http.post("/v1/stripe/webhook", content=b"{}")
            http.post("/v1/stripe/webhook", content=b"{}", headers={"Stripe-Signature": "t=1,v1=0"})
            http.put(f"/v1/orgs/{uuid.uuid4()}", content=b"{", headers=AUTH)
            http.put("/v1/plans/free", content=b"{", headers=AUTH)
        yield process


def _growth_kb(process: Process, send: Callable[[], RawAnswer]) -> tuple[int, int, RawAnswer]:
    """Run ``send`` and return (peak RSS growth, peak high-water-mark growth, what send returned)."""
    rss_before, hwm_before = process.memory_kb()
    with PeakSampler(process) as sampler:
        answer = send()
    _, hwm_after = process.memory_kb()
    return sampler.peak_kb - rss_before, hwm_after - hwm_before, answer


@pytest.mark.parametrize(
    ("headers", "status"), [({}, 400), ({"Stripe-Signature": "t=1,v1=00"}, 413)], ids=["unsigned", "signed"]
)
def test_300_mb_chunked_webhook_body_leaves_the_server_memory_flat(
    api: Process, headers: dict[str, str], status: int
) -> None:
    assert api.port is not None
    rss_growth, hwm_growth, answer = _growth_kb(
        api, lambda: stream_request(api.port, "POST", "/v1/stripe/webhook", headers, 300 * MB, CHUNK)
    )
    assert answer.status == status
    assert rss_growth < GROWTH_LIMIT_KB, f"RSS grew by {rss_growth} kB"
    assert hwm_growth < GROWTH_LIMIT_KB, f"peak RSS grew by {hwm_growth} kB"


@pytest.mark.parametrize(
    ("path", "size_mb"),
    [
        ("/v1/orgs/{org}", 300),
        ("/v1/orgs/{org}/projects/{project}", 200),
        ("/v1/plans/free", 250),
    ],
)
def test_huge_admin_bodies_leave_the_server_memory_flat(api: Process, path: str, size_mb: int) -> None:
    assert api.port is not None
    target = path.format(org=uuid.uuid4(), project=uuid.uuid4())
    rss_growth, hwm_growth, answer = _growth_kb(
        api, lambda: stream_request(api.port, "PUT", target, AUTH, size_mb * MB, CHUNK)
    )
    assert answer.status == 413
    assert json.loads(answer.body)["msg"] == "body exceeds 65,536 bytes"
    assert rss_growth < GROWTH_LIMIT_KB, f"RSS grew by {rss_growth} kB"
    assert hwm_growth < GROWTH_LIMIT_KB, f"peak RSS grew by {hwm_growth} kB"


def test_signed_webhook_still_works_through_the_bounded_reader(api: Process) -> None:
    body = json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "object": "event",
            "type": "charge.refunded",
            "created": 1,
            "data": {"object": {"id": "ch_1", "object": "charge"}},
        }
    ).encode()
    with httpx.Client(base_url=api.base_url, timeout=30) as http:
        response = http.post(
            "/v1/stripe/webhook",
            content=body,
            headers={"Stripe-Signature": sign_payload(body, WEBHOOK_SECRET)},
        )
    assert (response.status_code, response.json()["ok"]) == (200, True)


# --- Ctrl-C / SIGTERM with requests in flight -------------------------------------------------------


STOP_SECONDS = 10


def _in_flight_push(process: Process, org_project: str) -> threading.Thread:
    """A push that cannot finish: no worker polls the API's task queue, so it waits on its workflow."""
    now = datetime.now(UTC).replace(microsecond=0)
    body = {
        "metrics": [
            {
                "project_id": org_project,
                "tag": "task.created",
                "created_at": now.isoformat(),
                "updated_at": now.isoformat(),
                "increment": 1,
            }
        ]
    }

    def push() -> None:
        try:
            httpx.post(f"{process.base_url}/v1/metrics", json=body, headers=AUTH, timeout=120)
        except httpx.HTTPError:
            pass  # the server went away mid-request, as it should on SIGTERM

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_api_stops_within_10_s_with_requests_in_flight(
    process_database: str, temporal_env: WorkflowEnvironment, stop_signal: signal.Signals
) -> None:
    env = process_env(
        process_database,
        temporal_env.client.service_client.config.target_host,
        f"idle-{uuid.uuid4().hex[:10]}",
    )
    org_id, project_id = str(uuid.uuid4()), str(uuid.uuid4())
    with billing_process("api", env, "API on") as process:
        assert process.port is not None
        with httpx.Client(base_url=process.base_url, headers=AUTH, timeout=30) as http:
            assert http.put(f"/v1/orgs/{org_id}", json={}).status_code == 200
            assert http.put(f"/v1/orgs/{org_id}/projects/{project_id}", json={}).status_code == 200
        push = _in_flight_push(process, project_id)
        # A second request in flight: a chunked body that has begun and never ends.
        slow = socket.create_connection(("127.0.0.1", process.port), timeout=30)
        slow.sendall(
            f"PUT /v1/orgs/{org_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n".encode()
        )
        push.join(timeout=3)  # gives the push time to be in flight; it does not end by itself
        assert push.is_alive()
        process.proc.send_signal(stop_signal)
        try:
            code = process.proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"billing api still running {STOP_SECONDS} s after {stop_signal.name}")
        finally:
            slow.close()
    assert code == 0


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_worker_stops_within_10_s_with_work_in_flight(
    process_database: str, temporal_env: WorkflowEnvironment, stop_signal: signal.Signals
) -> None:
    queue = f"busy-{uuid.uuid4().hex[:10]}"
    address = temporal_env.client.service_client.config.target_host
    env = process_env(process_database, address, queue)
    org_id, project_id = str(uuid.uuid4()), str(uuid.uuid4())
    with (
        billing_process("worker", env, "worker on task queue") as worker,
        billing_process("api", env, "API on") as api,
    ):
        with httpx.Client(base_url=api.base_url, headers=AUTH, timeout=60) as http:
            assert http.put(f"/v1/orgs/{org_id}", json={}).status_code == 200
            assert http.put(f"/v1/orgs/{org_id}/projects/{project_id}", json={}).status_code == 200
        push = _in_flight_push(api, project_id)
        worker.proc.send_signal(stop_signal)
        try:
            code = worker.proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"billing worker still running {STOP_SECONDS} s after {stop_signal.name}")
        api.proc.send_signal(stop_signal)
        api_code = api.proc.wait(timeout=STOP_SECONDS)
        push.join(timeout=STOP_SECONDS)
    assert (code, api_code) == (0, 0)


def _memory_answers(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('billing_quota_checks_total{source="memory"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_api_process_answers_quota_checks_from_memory_and_enforces_a_commit_within_the_bound(
    api: Process, process_database: str
) -> None:
    project = str(uuid.uuid4())
    check = f"/v1/projects/{project}/quota"
    with httpx.Client(base_url=api.base_url, headers=AUTH, timeout=30) as http:
        deadline = time.monotonic() + 30
        while True:  # until the process's flag cache follows PostgreSQL
            before = _memory_answers(http)
            assert http.get(check, params=WRITE).status_code == 200
            if _memory_answers(http) > before:
                break
            assert time.monotonic() < deadline, "the API never answered from memory"
            time.sleep(0.05)
        with psycopg.connect(process_database, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO quota_flags (project_id, tag, organization_id, reason, month) VALUES"
                " (%s, 'task.created', gen_random_uuid(), 'over_limit', date_trunc('month', now())::date)",
                [project],
            )
        committed = time.monotonic()
        while (status := http.get(check, params=WRITE).status_code) != 403:
            assert status == 200
            # A request sent once the commit is QUOTA_CACHE_MAX_AGE_SECONDS old is answered 403.
            assert time.monotonic() - committed < QUOTA_CACHE_MAX_AGE_SECONDS, "stale past the bound"
