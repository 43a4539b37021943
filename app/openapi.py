"""The OpenAPI document tells the truth: every status an operation can answer (with the error
envelope), its media types, the limits this app's settings impose, and bearer auth when keys
are configured.

Routes declare their answers with :func:`answers`; :func:`document` writes the settings'
limits (``maximum``, ``maxLength``, ``maxItems``) into the request schemas once per app.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas import ErrorResponse
from app.settings import Settings

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer", "minimum": 1}}}
ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "the body is not valid JSON (`invalid_json`)"},
    401: {"description": "missing or invalid API key (`authentication_error`), when "
                         "GREENROUTE_API_KEYS is set",
          "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
    404: {"description": "unknown variant (`model_not_found`)"},
    413: {"description": "body over GREENROUTE_MAX_BODY_BYTES (`payload_too_large`)"},
    422: {"description": "a field is invalid, or the prompt plus the tokens asked for exceed "
                         "the model's context (`context_length_exceeded`), or no variant "
                         "meets the budget and the server rejects such requests "
                         "(`budget_unsatisfiable`)"},
    429: {"description": "the lane's queue is full (`queue_full`) or the device is over its "
                         "power cap (`power_cap`)", "headers": RETRY_AFTER},
    500: {"description": "the engine failed (`internal_error`; details in the server log)"},
    503: {"description": "the ladder is still loading (`not_ready`) or the pinned variant "
                         "failed to load (`variant_unavailable`)", "headers": RETRY_AFTER},
    504: {"description": "generation ran past GREENROUTE_REQUEST_TIMEOUT_S (`timeout`)"},
}
GENERATION_ERRORS = (400, 401, 404, 413, 422, 429, 500, 503, 504)
LADDER_ERRORS = (401, 503)
# One Server-Sent Event as a client parses it (OpenAPI 3.1: `schema` describes each event)
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"},
                            "data": {"type": "string", "description": "JSON, see above"}}}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}


def answers(ok: type | None, *errors: int, stream: str | None = None,
            headers: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of one operation: 200 (``ok``'s schema, plus Server-Sent Events
    described by ``stream`` when the operation can stream) and each error status with the
    envelope."""
    success: dict[str, Any] = {"description": "success"}
    if ok is not None:
        success["model"] = ok
    if stream is not None:
        success["description"] = f"JSON; with `stream: true`, Server-Sent Events: {stream}"
        success["content"] = SSE
    if headers:
        success["headers"] = headers
    out: dict[int | str, dict[str, Any]] = {200: success}
    for status in errors:
        out[status] = {"model": ErrorResponse, **ERRORS[status]}
    return out


def _constrain(schema: dict[str, Any], type_: str, **limits: Any) -> None:
    """Set ``limits`` on ``schema`` and on its ``anyOf`` branches of JSON type ``type_``."""
    for node in [schema, *schema.get("anyOf", [])]:
        if node.get("type") == type_:
            node.update(limits)


def _limit_requests(schemas: dict[str, Any], s: Settings) -> None:
    """Write the settings' limits into the request schemas (the routes enforce the same)."""
    for model, fields in {"GenerateRequest": ("max_new_tokens",),
                          "CompletionRequest": ("max_tokens", "max_completion_tokens"),
                          "ChatRequest": ("max_tokens", "max_completion_tokens")}.items():
        props = schemas[model]["properties"]
        for field in fields:
            _constrain(props[field], "integer", maximum=s.max_new_tokens_limit)
        stop = props["stop"]
        if s.max_stop_sequences < 1:  # no stop sequence at all: only null or []
            stop["anyOf"] = [b for b in stop["anyOf"] if b["type"] != "string"]
        _constrain(stop, "array", maxItems=s.max_stop_sequences)
    _constrain(schemas["GenerateRequest"]["properties"]["prompt"], "string",
               maxLength=s.max_prompt_chars)
    for branch in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        _constrain(branch.get("items", branch), "string", maxLength=s.max_prompt_chars)
    schemas["ChatRequest"]["properties"]["messages"]["maxItems"] = s.max_messages
    content = schemas["ChatMessage"]["properties"]["content"]
    _constrain(content, "string", maxLength=s.max_prompt_chars)
    _constrain(content, "array", maxItems=s.max_content_parts)
    _constrain(schemas["ContentPart"]["properties"]["text"], "string",
               maxLength=s.max_prompt_chars)


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _integer_bounds(node: Any) -> None:
    """Integer bounds as integers: FastAPI's OpenAPI model writes them as floats, and 2**63 - 1
    as a float is 2**63 (a seed the server refuses would look valid)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in BOUNDS:
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            _integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integer_bounds(value)


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """``app``'s OpenAPI document with this app's limits and auth (built once, then cached)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    _limit_requests(doc["components"]["schemas"], settings)
    _integer_bounds(doc)
    if settings.api_keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for operations in doc["paths"].values():
            for operation in operations.values():
                if "401" in operation["responses"]:
                    operation["security"] = [{"bearer": []}]
    else:  # nothing answers 401 without keys
        for operations in doc["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("401", None)
    app.openapi_schema = doc
    return doc
