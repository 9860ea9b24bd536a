"""Usage endpoints: ``POST /v1/metrics`` (counter rows in) and ``GET /v1/projects/{id}/quota``."""

from __future__ import annotations

import re
from typing import Any

from opentelemetry import trace
from starlette.requests import Request
from starlette.responses import JSONResponse
from temporalio.service import RPCError

from api.auth import require_bearer
from api.errors import ApiError
from api.validation import parse_json, path_uuid, read_body
from billing.sql import query
from billing.telemetry import USAGE_ROWS
from billing.usage_batches import MAX_ROWS, batch_answer, parse_metrics, run_usage_sync, stage_batch

# 100,000 rows of the contract's shape fit in about 25 MB; refuse bodies far beyond that before
# reading them whole, whatever Content-Length claims.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Writes the product's gateway asks about: they consume quota, so a flagged project is refused.
_QUOTA_WRITES = re.compile(r"^/api/v1/(session/[^/]+/messages|disk/[^/]+/artifact)/?$")
# How long a push waits for the monthly resets its rows need before it skips their orgs; a deployment
# (or a test) may set ``app.state.reset_wait_seconds``.
RESET_WAIT_SECONDS = 60.0


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

    The same rows pushed again are the same batch: staged once, applied once, answered alike.
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
        )
    except RPCError as exc:
        raise ApiError(
            503, f"could not run usage-sync/{batch.batch_id} ({exc.message}); retry the push"
        ) from None
    answer: dict[str, Any] = await batch_answer(pool, batch.batch_id)
    if result.skipped_orgs:
        # Not rejected: these rows are applied by a retried push of this batch or by the next sync.
        answer["skipped"] = [skip.model_dump() for skip in result.skipped_orgs]
    return JSONResponse(answer)


async def get_quota(request: Request) -> JSONResponse:
    """200 ``ok``, or 403 ``quota exceeded`` for a quota-consuming write of a flagged project.

    A project is flagged when any of its meters is (over a free limit, or its org payment-blocked);
    an unknown project has no flags and is answered ``ok``, as the original system did.
    """
    require_bearer(request)
    project_id = path_uuid(request, "project_id")
    path = request.query_params.get("path", "")
    method = request.query_params.get("method", "GET").upper()
    if method == "POST" and _QUOTA_WRITES.match(path):
        async with request.app.state.pool.connection() as conn:
            row = await (await conn.execute(query("project_flagged"), {"project_id": project_id})).fetchone()
        if row is not None and row["flagged"]:
            return JSONResponse({"msg": "quota exceeded"}, status_code=403)
    return JSONResponse({"msg": "ok"})
