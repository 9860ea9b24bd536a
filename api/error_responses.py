"""The API's single error shape: ``{"code": <status>, "error": <short>, "msg": <sentence>}``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

_SHORT = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """Raised by handlers; turned into the error shape with its status."""

    def __init__(self, status: int, msg: str, error: str | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.error = error or _SHORT.get(status, "error")


def error_response(status: int, msg: str, error: str | None = None) -> JSONResponse:
    """A JSON error response in the contract's shape."""
    return JSONResponse(
        {"code": status, "error": error or _SHORT.get(status, "error"), "msg": msg}, status_code=status
    )


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a pydantic error as one sentence, e.g. ``plan: Input should be ...``."""
    first = exc.errors()[0]
    where = ".".join(_shown(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def _shown(part: object) -> str:
    """A location part (a field name, an index, or a dict key from the input) bounded and printable."""
    text = str(part)
    if len(text) > 64:
        text = text[:64] + "..."
    # A key from the input may hold control characters; show them escaped, never raw.
    return text if text.isprintable() else repr(text)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.msg, exc.error)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    messages = {404: "no such endpoint", 405: "method not allowed on this endpoint"}
    return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, "internal error; the request may be retried")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: _api_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
