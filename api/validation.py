"""Bounded reading of request bodies, and parsing of path parameters and JSON bodies into models.

Every endpoint reads its body through :func:`read_body`: a declared ``Content-Length`` over the limit
is refused before a byte is read, and a streamed (chunked) body is refused with 413 as soon as the
limit is passed, so the rest is never buffered. JSON is parsed by :func:`parse_json`, which refuses
nesting beyond :data:`MAX_JSON_DEPTH` with 400 (no request body of this API needs more than 3).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from api.error_responses import ApiError, describe_validation_error
from billing.domain.ids import canonical_uuid

ModelT = TypeVar("ModelT", bound=BaseModel)

# The admin bodies are a few small fields (a plan's limits: one entry per meter): 64 KiB is far above
# any real one and keeps a hostile body from costing more than that.
MAX_ADMIN_BODY_BYTES = 64 * 1024
# Deepest nesting of any accepted body is 3 ({"metrics": [{...}]}, {"limits": {...}}); 32 leaves room
# and keeps a "[[[[..." body from reaching the parser's recursion limit.
MAX_JSON_DEPTH = 32


def path_uuid(request: Request, name: str) -> str:
    """A path parameter that must be a UUID, in canonical form; 400 otherwise."""
    raw = request.path_params[name]
    try:
        return canonical_uuid(raw)
    except ValueError:
        shown = raw if len(raw) <= 64 else raw[:64] + "..."
        raise ApiError(400, f"{name} must be a UUID, got {shown!r}") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes; 413 as soon as it is known to be longer.

    A declared Content-Length over the limit is refused before reading; a chunked body is read chunk
    by chunk and refused when the running size passes the limit, without reading the rest (the
    server then closes the connection).
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {int(declared):,} bytes exceeds {limit:,} bytes")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise ApiError(413, f"body exceeds {limit:,} bytes")
        body += chunk
    return bytes(body)


def _too_deep(data: Any, max_depth: int) -> bool:
    """Whether ``data`` nests objects/arrays deeper than ``max_depth`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH, empty: Any = None) -> Any:
    """``raw`` as JSON; 400 when it is not JSON or nests deeper than ``max_depth``.

    An empty body is ``empty`` when given, else a 400.
    """
    if not raw.strip() and empty is not None:
        return empty
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "body is not valid JSON") from None
    except ValueError:
        # An integer literal of more than 4,300 digits (Python's conversion limit): no column takes it.
        raise ApiError(400, "body holds a number too large to be read") from None
    except RecursionError:
        # The C parser gives up on very deep nesting before our own check can run.
        raise ApiError(400, f"body nests JSON deeper than {max_depth} levels") from None
    if _too_deep(data, max_depth):
        raise ApiError(400, f"body nests JSON deeper than {max_depth} levels")
    return data


async def json_body(request: Request, model: type[ModelT], *, limit: int = MAX_ADMIN_BODY_BYTES) -> ModelT:
    """The request body as ``model``; 413 over ``limit``, 400 with the first problem otherwise."""
    data = parse_json(await read_body(request, limit), empty={})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, describe_validation_error(exc)) from None
