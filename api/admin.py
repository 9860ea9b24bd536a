"""Admin endpoints: organizations, projects, plan limits, and an org's billing status."""

from __future__ import annotations

from typing import Annotated

import psycopg
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from api.auth import require_bearer
from api.error_responses import ApiError
from api.validation import json_body, path_uuid
from billing.adapters.notification_delivery import org_notifications
from billing.core.clock import current_month
from billing.db.sql import query
from billing.domain.months import parse_month
from billing.domain.plans import PLANS, Plan
from billing.models import MAX_BIGINT, MAX_ID_LENGTH, Name, Tag
from billing.read.status import add_temporal_view, load_org_status

_PLAN_NAMES = ", ".join(PLANS[:-1]) + f" and {PLANS[-1]}"  # "free, pro and team"
# A JSON integer only (no booleans, strings or floats) within bigint; a negative one is refused below
# with its own message.
Limit = Annotated[int, Field(strict=True, ge=-MAX_BIGINT - 1, le=MAX_BIGINT)]
# A JSON integer only; its range (1 to 1000 percent) is checked by put_plan with a message of its own.
StrictPercent = Annotated[int, Field(strict=True)]


class OrgBody(BaseModel):
    """``PUT /v1/orgs/{org_id}``: every field optional; a new org's plan defaults to free."""

    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    plan: Plan | None = None
    stripe_customer_id: str | None = Field(
        default=None, pattern=r"^cus_[A-Za-z0-9]+$", max_length=MAX_ID_LENGTH, strict=True
    )


class ProjectBody(BaseModel):
    """``PUT /v1/orgs/{org_id}/projects/{project_id}``."""

    model_config = ConfigDict(extra="forbid")
    name: Name | None = None


class PlanBody(BaseModel):
    """``PUT /v1/plans/{plan}``: included quantity per meter tag, and optionally the notification
    thresholds (percentages of each included quantity; replaces the plan's set, [] for none)."""

    model_config = ConfigDict(extra="forbid")
    # JSON integers only, at most 2^63-1 (the bigint column; negatives refused in put_plan); at most
    # one entry per meter and then some.
    limits: dict[Tag, Limit] = Field(default_factory=dict, max_length=64)
    # Percentages of each included quantity at which the product is told (default 80 and 100).
    thresholds: list[StrictPercent] | None = Field(default=None, max_length=20)


class ProjectAnswer(BaseModel):
    """``PUT /v1/orgs/{org_id}/projects/{project_id}``: the attachment as stored."""

    org_id: str
    project_id: str
    name: str | None


class PlanAnswer(BaseModel):
    """``PUT /v1/plans/{plan}``: the limits just set, and the plan's notification thresholds."""

    plan: Plan
    limits: dict[str, int]
    thresholds: list[int]


async def _recompute_flags(conn: psycopg.AsyncConnection, org_ids: list[str]) -> None:
    await conn.execute(
        query("recompute_quota_flags"), {"org_ids": org_ids, "month": parse_month(current_month())}
    )


async def put_org(request: Request) -> JSONResponse:
    """Create or update an org; a plan change recomputes its quota flags at once."""
    require_bearer(request)
    org_id = path_uuid(request, "org_id")
    body = await json_body(request, OrgBody)
    try:
        async with request.app.state.pool.connection() as conn:
            await conn.execute(query("upsert_org"), {"org_id": org_id, **body.model_dump()})
            await _recompute_flags(conn, [org_id])
    except psycopg.errors.UniqueViolation:
        raise ApiError(409, f"stripe_customer_id {body.stripe_customer_id} belongs to another org") from None
    return await _org_response(request, org_id)


async def put_project(request: Request) -> JSONResponse:
    """Attach a project to an org; 409 when it belongs to another org, 404 for an unknown org."""
    require_bearer(request)
    org_id = path_uuid(request, "org_id")
    project_id = path_uuid(request, "project_id")
    body = await json_body(request, ProjectBody)
    try:
        async with request.app.state.pool.connection() as conn:
            cursor = await conn.execute(
                query("attach_project"), {"org_id": org_id, "project_id": project_id, "name": body.name}
            )
            row = await cursor.fetchone()
            if row is None:
                raise ApiError(409, f"project {project_id} belongs to another organization")
            await _recompute_flags(conn, [org_id])
    except psycopg.errors.ForeignKeyViolation:
        raise ApiError(
            404, f"organization {org_id} does not exist; create it with PUT /v1/orgs/{org_id}"
        ) from None
    return JSONResponse(ProjectAnswer.model_validate(row).model_dump(mode="json"))


async def put_plan(request: Request) -> JSONResponse:
    """Set a plan's included quantities; every org on the plan has its flags recomputed."""
    require_bearer(request)
    plan = request.path_params["plan"]
    if plan not in PLANS:
        raise ApiError(400, f"unknown plan {plan!r}; plans are {_PLAN_NAMES}")
    body = await json_body(request, PlanBody)
    async with request.app.state.pool.connection() as conn:
        known = {row["tag"] for row in await (await conn.execute(query("meter_tags"))).fetchall()}
        unknown = sorted(set(body.limits) - known)
        if unknown:
            raise ApiError(400, f"unknown meter tag {unknown[0]!r}; known tags: {', '.join(sorted(known))}")
        negative = sorted(tag for tag, value in body.limits.items() if value < 0)
        if negative:
            raise ApiError(400, f"limit of {negative[0]!r} must not be negative")
        bad = sorted(p for p in body.thresholds or [] if not 1 <= p <= 1000)
        if bad:
            raise ApiError(400, f"threshold {bad[0]} must be a percentage between 1 and 1000")
        async with conn.transaction():
            tags = sorted(body.limits)
            cursor = await conn.execute(
                query("set_plan_limits"),
                {"plan": plan, "tags": tags, "included": [body.limits[tag] for tag in tags]},
            )
            row = await cursor.fetchone()
            assert row is not None
            if body.thresholds is not None:
                await conn.execute(
                    query("set_plan_thresholds"), {"plan": plan, "percents": sorted(set(body.thresholds))}
                )
            if row["org_ids"]:
                await _recompute_flags(conn, row["org_ids"])
        thresholds = await (await conn.execute(query("plan_thresholds"), {"plan": plan})).fetchone()
    assert thresholds is not None
    answer = PlanAnswer(plan=plan, limits=body.limits, thresholds=thresholds["percents"])
    return JSONResponse(answer.model_dump(mode="json"))


async def get_plan(request: Request) -> JSONResponse:
    """A plan's included quantities, as ``PUT /v1/plans/{plan}`` takes them (null: unlimited)."""
    require_bearer(request)
    plan = request.path_params["plan"]
    if plan not in PLANS:
        raise ApiError(400, f"unknown plan {plan[:40]!r}; plans are {_PLAN_NAMES}")
    async with request.app.state.pool.connection() as conn:
        rows = await (await conn.execute(query("plan_limits"), {"plan": plan})).fetchall()
    return JSONResponse({"plan": plan, "limits": {row["tag"]: row["included"] for row in rows}})


async def get_org(request: Request) -> JSONResponse:
    """The org's plan, payment status, usage against limits, flags and pending Stripe reports."""
    require_bearer(request)
    return await _org_response(request, path_uuid(request, "org_id"), with_workflows=True)


async def _org_response(request: Request, org_id: str, *, with_workflows: bool = False) -> JSONResponse:
    settings = request.app.state.settings
    status = await load_org_status(
        request.app.state.pool, org_id, current_month(), stripe_configured=settings.stripe_api_key is not None
    )
    if status is None:
        raise ApiError(404, f"organization {org_id} does not exist")
    if with_workflows:
        await add_temporal_view(status, request.app.state.client)
    answer = status.model_dump(mode="json")
    # The recent notifications to the product, with their delivery state (`billing notifications`).
    answer["notifications"] = await org_notifications(request.app.state.pool, org_id, limit=10)
    return JSONResponse(answer)
