"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

``model`` is ``auto`` (routed) or a variant name; budgets come as extra body fields
``latency_budget_ms``, ``min_quality`` (and ``max_joules``); ``usage`` adds ``energy_joules``,
``avg_watts`` and ``energy_source``. Streaming sends chunks and ends with ``data: [DONE]``.
Chat messages are rendered with the ladder's chat template (:mod:`models.chat`); completions
take the prompt as raw text.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.deps import ServiceDep, SettingsDep, require_api_key
from app.errors import ApiError, sse_error, stream_error
from app.routes.common import (
    SSE_HEADERS,
    check_prompt,
    cost_headers,
    finish,
    make_budget,
    make_params,
    pinned,
    sse,
)
from app.schemas import ChatMessage, ChatRequest, CompletionRequest, OpenAIBase
from app.service import Call, GenerationService, Outcome, Run
from app.settings import Settings
from models.chat import ChatTemplate

router = APIRouter(dependencies=[Depends(require_api_key)])


def _usage(o: Outcome) -> dict[str, Any]:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens,
            "energy_joules": o.energy.joules, "avg_watts": o.energy.avg_watts,
            "energy_source": o.energy.source, "energy_estimated": o.energy.estimated,
            **({"gco2e": o.gco2e} if o.gco2e is not None else {})}


def _call(body: OpenAIBase, prompt: str, endpoint: str, settings: Settings,
          extra_stop: tuple[str, ...] = ()) -> Call:
    max_tokens = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    params = make_params(settings, max_new_tokens=max_tokens, temperature=body.temperature,
                         top_p=body.top_p, top_k=0, seed=body.seed, stop=body.stop,
                         field=field)
    if extra_stop:  # the template's own stops, on top of (and not counted in) the caller's
        params = dataclasses.replace(params, stop=tuple(dict.fromkeys((*params.stop,
                                                                       *extra_stop))))
    return Call(prompt=prompt, params=params, endpoint=endpoint, variant=pinned(body.model),
                stream=body.stream,
                budget=make_budget(settings, body.latency_budget_ms, body.min_quality,
                                   body.max_joules))


def _chat_prompt(template: ChatTemplate, messages: list[ChatMessage],
                 settings: Settings) -> str:
    """``messages`` rendered with the chat template; a template's own refusal (its
    ``raise_exception``, e.g. roles that must alternate) is the caller's 422."""
    try:
        prompt = template.render([{"role": m.role, "content": m.text} for m in messages])
    except ValueError as err:
        raise ApiError(422, "invalid_request_error", f"the model's chat template refused "
                       f"these messages: {err}", "messages") from err
    return check_prompt(settings, prompt, "messages")


def _open(service: GenerationService, call: Call) -> Run:
    try:
        return service.open(call)
    except ApiError as err:
        if err.param == "variant":  # OpenAI clients name it `model`
            err.param = "model"
        raise


ChunkFn = Callable[[str, str | None, bool], dict[str, Any]]


async def _stream(run: Run, chunk: ChunkFn) -> AsyncIterator[str]:
    """Chunks, then ``data: [DONE]``; a failure after the start sends one
    ``{"error": {...}}`` event (as OpenAI and vLLM do) before ``[DONE]``."""
    first = True
    try:
        async for event in run.events():
            if isinstance(event, Outcome):  # last chunk: finish reason, usage and energy
                yield sse({**chunk("", event.finish_reason, False), "usage": _usage(event)})
            elif event.text or first:
                yield sse(chunk(event.text, None, first))
                first = False
    except Exception as err:
        yield sse_error(stream_error(err, run.call.id))
    yield sse("[DONE]")


async def _answer(stream: bool, run: Run, request: Request, chunk: ChunkFn,
                  whole: Callable[[Outcome], dict[str, Any]]) -> Any:
    """SSE chunks when streaming, else one JSON body (``whole``) with usage and energy."""
    if stream:
        return StreamingResponse(_stream(run, chunk), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, "X-Greenroute-Variant": run.route.variant})
    o = await finish(run, request)
    return JSONResponse({**whole(o), "usage": _usage(o)}, headers=cost_headers(o))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, service: ServiceDep,
                      settings: SettingsDep) -> Any:
    call = _call(body, check_prompt(settings, body.prompt_text), "/v1/completions", settings)
    run = _open(service, call)
    cid, created = f"cmpl-{call.id}", int(time.time())

    def chunk(text: str, reason: str | None, _first: bool) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created,
                "model": run.route.variant,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": reason}]}

    return await _answer(body.stream, run, request, chunk,
                         lambda o: chunk(o.text, o.finish_reason, False))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, service: ServiceDep,
                           settings: SettingsDep) -> Any:
    template = service.chat_template
    prompt = _chat_prompt(template, body.messages, settings)
    call = _call(body, prompt, "/v1/chat/completions", settings,
                 extra_stop=template.stop_strings)
    run = _open(service, call)
    cid, created = f"chatcmpl-{call.id}", int(time.time())

    def chunk(text: str, reason: str | None, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        return {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": run.route.variant,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": reason}]}

    def whole(o: Outcome) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion", "created": created, "model": o.variant,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": o.text},
                             "logprobs": None, "finish_reason": o.finish_reason}]}

    return await _answer(body.stream, run, request, chunk, whole)


@router.get("/v1/models")
async def models(service: ServiceDep) -> dict[str, Any]:
    created = int(time.time())
    names = ["auto", *(v.name for v in service.ladder.manifest.ordered()
                       if v.name in service.ladder.engines)]
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created,
                                        "owned_by": "greenroute",
                                        "chat_template": service.chat_template.source}
                                       for n in names]}


