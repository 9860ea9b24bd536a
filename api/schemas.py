"""The API's OpenAPI 3.1 document, generated from the pydantic models that validate it.

Request bodies are the models the handlers validate with (``OrgBody``, ``ProjectBody``, ``PlanBody``);
answers are the models the handlers answer with (``OrgStatus``, ``ProjectAnswer``, ``PlanAnswer``) or
that describe a handler's answer (the push, quota, webhook and health answers). Each model's schema
comes from pydantic's JSON Schema generation (draft 2020-12, which OpenAPI 3.1 uses as is); this
module only lays the paths out. ``GET /openapi.json`` serves it; the test suite fuzzes the running
app against it with schemathesis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from api.admin import OrgBody, PlanAnswer, PlanBody, ProjectAnswer, ProjectBody
from api.validation import MAX_ADMIN_BODY_BYTES, MAX_JSON_DEPTH
from billing.domain.plans import PLANS
from billing.models import MAX_BIGINT, MAX_TAG_LENGTH
from billing.orchestration.usage_batches import MAX_ROWS
from billing.read.status import OrgStatus


class ErrorAnswer(BaseModel):
    """Every error: the HTTP status, a short code and a sentence."""

    code: int
    error: str
    msg: str


class CounterRow(BaseModel):
    """One counter row of the core service. A row that breaks these rules is a ``rejected`` entry of
    the answer (with its index and reason), not a refusal of the whole push."""

    project_id: Annotated[str, Field(json_schema_extra={"format": "uuid"})]
    tag: Annotated[str, Field(min_length=1, max_length=MAX_TAG_LENGTH)]
    created_at: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    updated_at: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    increment: Annotated[int, Field(ge=0, le=MAX_BIGINT)]


class MetricsBody(BaseModel):
    """``POST /v1/metrics``: up to 100,000 counter rows."""

    metrics: Annotated[list[CounterRow], Field(max_length=MAX_ROWS)]


class QuotaEntry(BaseModel):
    """Whether the gateway must refuse writes of one meter of one project of the push."""

    project_id: str
    tag: str
    excess: bool


class Rejection(BaseModel):
    """A row of the push that changed nothing, and why."""

    index: int
    reason: str


class MetricsAnswer(BaseModel):
    """The push's outcome. Other keys (rows held back and why, the batch id) may be present."""

    model_config = ConfigDict(extra="allow")
    quota: list[QuotaEntry]
    rejected: list[Rejection]


class QuotaAnswer(BaseModel):
    """``ok``, or ``quota exceeded`` (403)."""

    msg: Literal["ok", "quota exceeded"]


class WebhookAnswer(BaseModel):
    """The event is durably with Temporal, or redelivering it cannot help (``ignored``, ``duplicate``)."""

    model_config = ConfigDict(extra="allow")
    ok: Literal[True]


class HealthAnswer(BaseModel):
    """Each dependency: ``ok`` or ``unavailable: <why>``."""

    ok: bool
    postgres: str
    temporal: str


@dataclass(frozen=True)
class Operation:
    """One method and path of the API with its body, parameters and answers."""

    method: str
    path: str
    summary: str
    auth: bool
    body: type[BaseModel] | None = None
    answers: dict[int, type[BaseModel] | None] = field(default_factory=dict)
    parameters: list[dict[str, Any]] = field(default_factory=list)
    text_answer: bool = False


def _path_uuid(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


_AUTH_ERRORS: dict[int, type[BaseModel] | None] = {400: ErrorAnswer, 401: ErrorAnswer}
_BODY_ERRORS: dict[int, type[BaseModel] | None] = {**_AUTH_ERRORS, 413: ErrorAnswer}

OPERATIONS = [
    Operation(
        "post",
        "/v1/metrics",
        "Push counter rows",
        True,
        MetricsBody,
        {200: MetricsAnswer, **_BODY_ERRORS, 503: MetricsAnswer},
    ),
    Operation(
        "get",
        "/v1/projects/{project_id}/quota",
        "May the gateway let this request through",
        True,
        None,
        {200: QuotaAnswer, 403: QuotaAnswer, **_AUTH_ERRORS},
        [
            _path_uuid("project_id"),
            {"name": "path", "in": "query", "required": False, "schema": {"type": "string"}},
            {"name": "method", "in": "query", "required": False, "schema": {"type": "string"}},
        ],
    ),
    Operation(
        "post",
        "/v1/stripe/webhook",
        "Stripe webhook receiver",
        False,
        None,
        {200: WebhookAnswer, 400: ErrorAnswer, 413: ErrorAnswer, 503: ErrorAnswer},
        [{"name": "Stripe-Signature", "in": "header", "required": True, "schema": {"type": "string"}}],
    ),
    Operation(
        "put",
        "/v1/orgs/{org_id}",
        "Create or update an organization",
        True,
        OrgBody,
        {200: OrgStatus, **_BODY_ERRORS, 409: ErrorAnswer},
        [_path_uuid("org_id")],
    ),
    Operation(
        "get",
        "/v1/orgs/{org_id}",
        "An organization's billing status",
        True,
        None,
        {200: OrgStatus, **_AUTH_ERRORS, 404: ErrorAnswer},
        [_path_uuid("org_id")],
    ),
    Operation(
        "put",
        "/v1/orgs/{org_id}/projects/{project_id}",
        "Attach a project to an organization",
        True,
        ProjectBody,
        {200: ProjectAnswer, **_BODY_ERRORS, 404: ErrorAnswer, 409: ErrorAnswer},
        [_path_uuid("org_id"), _path_uuid("project_id")],
    ),
    Operation(
        "put",
        "/v1/plans/{plan}",
        "Set a plan's included quantities",
        True,
        PlanBody,
        {200: PlanAnswer, **_BODY_ERRORS},
        [{"name": "plan", "in": "path", "required": True, "schema": {"enum": list(PLANS)}}],
    ),
    Operation(
        "get",
        "/healthz",
        "PostgreSQL and Temporal answer",
        False,
        None,
        {200: HealthAnswer, 503: HealthAnswer},
    ),
    Operation("get", "/metrics", "Prometheus metrics", False, None, {200: None}, text_answer=True),
    Operation("get", "/openapi.json", "This document", False, None, {200: None}),
]


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every operation, built once."""
    models = {op.body for op in OPERATIONS if op.body} | {
        model for op in OPERATIONS for model in op.answers.values() if model
    }
    keyed = [
        (model, "validation" if model in {OrgBody, ProjectBody, PlanBody, MetricsBody} else "serialization")
        for model in sorted(models, key=lambda m: m.__name__)
    ]
    refs, defs = models_json_schema(keyed, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {}
        for status, model in op.answers.items():
            if op.text_answer:
                content = {"text/plain": {"schema": {"type": "string"}}}
            elif model is None:
                content = {"application/json": {"schema": {"type": "object"}}}
            else:
                content = {"application/json": {"schema": refs[(model, "serialization")]}}
            responses[str(status)] = {
                "description": (model.__doc__ or "").strip().split("\n")[0] or "answer",
                "content": content,
            }
        operation: dict[str, Any] = {"summary": op.summary, "responses": responses}
        if op.parameters:
            operation["parameters"] = op.parameters
        if op.auth:
            operation["security"] = [{"bearer": []}]
        if op.body is not None:
            operation["requestBody"] = {
                "required": op.body is MetricsBody,
                "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
            }
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Billing orchestrator",
            "version": "1",
            "description": (
                f"Usage push, quota check, Stripe webhooks and admin. Body limits: admin bodies "
                f"{MAX_ADMIN_BODY_BYTES:,} bytes, JSON nesting {MAX_JSON_DEPTH} levels; see README."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
