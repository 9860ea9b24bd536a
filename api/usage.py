"""Usage endpoints: ``POST /v1/metrics`` (counter rows in) and ``GET /v1/projects/{id}/quota``."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from starlette.requests import Request
from starlette.responses import JSONResponse
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from api.auth import require_bearer
from api.error_responses import ApiError
from api.quota import flag_lookup, quota_consuming
from api.validation import parse_json, path_uuid, read_body
from billing.observability.telemetry import USAGE_ROWS
from billing.orchestration.temporal import BatchRefused, SyncStillRunning, run_usage_sync
from billing.orchestration.usage_batches import (
    MAX_ROWS,
    batch_answer,
    held_back_of,
    parse_metrics,
    stage_batch,
)

# 100,000 rows of the contract's shape fit in about 25 MB; refuse bodies far beyond that before
# reading them whole, whatever Content-Length claims.
MAX_BODY_BYTES = 64 * 1024 * 1024
# How long a push waits for the monthly resets its rows need before it skips their orgs; a deployment
# (or a test) may set ``app.state.reset_wait_seconds``.
RESET_WAIT_SECONDS = 60.0
# When a push that could not apply everything should come again (503 Retry-After).
RETRY_AFTER_SECONDS = 60


async def _read_body(request: Request) -> bytes:
    """The body, or 413 as soon as it is known to exceed MAX_BODY_BYTES (declared or streamed)."""
    return await read_body(request, MAX_BODY_BYTES)


def _metrics_of(raw: bytes) -> list[dict[str, Any]]:
    """The ``metrics`` list of the body; 400 unless the body is ``{"metrics": [{...}, ...]}``."""
    data = parse_json(raw)
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), list):
        raise ApiError(400, 'body must be an object {"metrics": [...]} with a list of counter rows')
    metrics: list[Any] = data["metrics"]
    if len(metrics) > MAX_ROWS:
        raise ApiError(413, f"{len(metrics):,} rows exceed the limit of {MAX_ROWS:,} rows per push")
    for index, item in enumerate(metrics):
        if not isinstance(item, dict):
            raise ApiError(400, f"metrics[{index}] must be an object, got {type(item).__name__}")
    return metrics


async def post_metrics(request: Request) -> JSONResponse:
    """Stage the pushed rows under their content hash, run ``usage-sync/{hash}``, answer its outcome.

    200 ``{"quota", "rejected"}`` only when every row was applied or rejected. 503 with Retry-After and
    the same body plus ``held_back`` (what and why) and ``batch_id`` when rows were held back (their
    org's new month is not opened yet) or the run did not finish within BILLING_PUSH_ANSWER_SECONDS.
    The same rows pushed again are the same batch: staged once, each row applied once.
    """
    require_bearer(request)
    metrics = _metrics_of(await _read_body(request))
    if not metrics:
        return JSONResponse({"quota": [], "rejected": []})
    batch = parse_metrics(metrics)
    span = trace.get_current_span()
    span.set_attribute("billing.batch_id", batch.batch_id)
    span.set_attribute("billing.rows", batch.received)
    pool = request.app.state.pool
    settings = request.app.state.settings
    if await stage_batch(pool, batch):
        USAGE_ROWS.labels("staged").inc(len(batch.rows))
        USAGE_ROWS.labels("rejected_unparsed").inc(len(batch.rejected))
    try:
        result = await run_usage_sync(
            request.app.state.client,
            settings.task_queue,
            batch.batch_id,
            reset_wait_seconds=getattr(request.app.state, "reset_wait_seconds", RESET_WAIT_SECONDS),
            answer_within=settings.push_answer_seconds,
        )
    except SyncStillRunning as exc:
        # The run goes on; the same body pushed again joins it (or reads its result back).
        answer = await batch_answer(pool, batch.batch_id)
        held = [{"org_id": None, "month": None, "reason": str(exc)}]
        return _not_yet_applied(batch.batch_id, answer, held)
    except BatchRefused as exc:
        raise ApiError(400, f"usage-sync/{batch.batch_id} refused the batch: {exc}") from None
    except (RPCError, WorkflowFailureError) as exc:
        reason = exc.message if isinstance(exc, RPCError) else str(exc.cause or exc)
        raise ApiError(503, f"could not run usage-sync/{batch.batch_id} ({reason}); retry the push") from None
    answer: dict[str, Any] = await batch_answer(pool, batch.batch_id)
    if result.orgs_skipped:
        # Not rejected: these rows apply when the same body is pushed again after their month opened.
        return _not_yet_applied(batch.batch_id, answer, await held_back_of(pool, batch.batch_id))
    return JSONResponse(answer)


def _not_yet_applied(batch_id: str, answer: dict[str, Any], held_back: list[dict[str, Any]]) -> JSONResponse:
    """503 with Retry-After: the body answered so far, the batch id, and what was held back and why."""
    return JSONResponse(
        {**answer, "held_back": held_back, "batch_id": batch_id},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def get_quota(request: Request) -> JSONResponse:
    """200 ``ok``, or 403 ``quota exceeded`` for a quota-consuming write of a flagged project.

    A project is flagged when any of its meters is (over a free limit, or its org payment-blocked);
    an unknown project has no flags and is answered ``ok``, as the original system did.
    """
    require_bearer(request)
    project_id = path_uuid(request, "project_id")
    path = request.query_params.get("path", "")
    method = request.query_params.get("method", "GET")
    if quota_consuming(method, path):
        # One read begun after this request arrived, shared with the checks queued alongside it.
        if await flag_lookup(request.app).flagged(project_id):
            return JSONResponse({"msg": "quota exceeded"}, status_code=403)
    return JSONResponse({"msg": "ok"})
