"""Parsing of path parameters and JSON bodies into models, with the API's error shape on failure."""

from __future__ import annotations

import json
import uuid
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from api.errors import ApiError, describe_validation_error

ModelT = TypeVar("ModelT", bound=BaseModel)


def path_uuid(request: Request, name: str) -> str:
    """A path parameter that must be a UUID, in canonical form; 400 otherwise."""
    raw = request.path_params[name]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise ApiError(400, f"{name} must be a UUID, got {raw!r}") from None


async def json_body(request: Request, model: type[ModelT]) -> ModelT:
    """The request body as ``model``; 400 with the first problem for malformed JSON or shape."""
    raw = await request.body()
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, describe_validation_error(exc)) from None
