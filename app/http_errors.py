"""One error envelope, ``{"error": {"type", "message", "param", "code"}}``, and its handlers.

Handlers are registered specific → general; caller mistakes are 4xx with an actionable message,
and an unexpected failure is a 500 that leaks no internals.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status and envelope fields."""

    def __init__(self, status: int, type_: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.param = param
        self.headers = headers or {}


def envelope(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "param": param, "code": type_}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(envelope(err.type, err.message, err.param), status_code=err.status,
                        headers=err.headers)


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(ApiError(400, "invalid_json",
                                       f"request body is not valid JSON: {first.get('msg')}"))
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(ApiError(422, "invalid_request_error", text, param))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kinds = {404: "not_found", 405: "method_not_allowed", 401: "authentication_error"}
    kind = kinds.get(exc.status_code, "invalid_request_error")
    return JSONResponse(envelope(kind, str(exc.detail)), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(envelope("internal_error", "internal error; see the server log"),
                        status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers from the most specific to the most general."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def stream_error(err: Exception, request_id: str) -> ApiError:
    """What a stream that has started says about ``err``: an :class:`ApiError` as it is,
    anything else as an internal error (logged here with the request id, never shown)."""
    if isinstance(err, ApiError):
        return err
    log.error("request %s: stream failed", request_id, exc_info=err)
    return ApiError(500, "internal_error", f"internal error; see the server log (request "
                    f"{request_id})")


def sse_error(err: ApiError, **extra: str) -> str:
    """The error envelope as one Server-Sent Event (a failure after a stream has started),
    with ``extra`` fields first (the native stream's ``"type": "error"``)."""
    body = {**extra, **envelope(err.type, err.message, err.param)}
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
