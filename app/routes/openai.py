"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

``model`` is ``auto`` (routed) or a variant name; budgets come as extra body fields
``latency_budget_ms``, ``min_quality`` (and ``max_joules``); ``usage`` adds ``energy_joules``,
``avg_watts`` and ``energy_source``. Streaming sends chunks and ends with ``data: [DONE]``.
Chat messages are rendered with the ladder's chat template (:mod:`models.runtime.chat`); completions
take the prompt as raw text.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.deps import RecentDep, ServiceDep, SettingsDep, require_api_key
from app.http_errors import ApiError, sse_error, stream_error
from app.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIBase,
    OpenAIUsage,
    openai_finish_reason,
)
from app.openapi import GENERATION_ERRORS, LADDER_ERRORS, answers
from app.recent import RecentRequests
from app.routes.common import (
    COST_HEADERS,
    check_length,
    check_prompt,
    check_tokens,
    energy_split,
    make_budget,
    make_params,
    pinned,
    respond,
    sse,
)
from app.service import Call, GenerationService, Outcome, Run
from app.settings import Settings
from models.runtime.chat import ChatTemplate

router = APIRouter(dependencies=[Depends(require_api_key)])
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (capped by the server limit)
STREAM = ("chunks (`text_completion` / `chat.completion.chunk`), the last with "
          "`finish_reason` and `usage`, then `data: [DONE]`; a failure after the start sends "
          "one `{\"error\": {...}}` event, then `data: [DONE]`")


def _usage(o: Outcome) -> OpenAIUsage:
    return OpenAIUsage(prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
                       total_tokens=o.prompt_tokens + o.completion_tokens,
                       energy_joules=o.energy.joules, avg_watts=o.energy.avg_watts,
                       energy_source=o.energy.source, energy_estimated=o.energy.estimated,
                       gco2e=o.gco2e, **energy_split(o))


def _usage_json(o: Outcome) -> dict[str, Any]:
    return _usage(o).model_dump(mode="json", exclude_none=True)  # gco2e only when configured


def _call(body: OpenAIBase, prompt: str, endpoint: str, settings: Settings,
          extra_stop: tuple[str, ...] = (), default_tokens: int | None = None) -> Call:
    for field in ("max_tokens", "max_completion_tokens"):  # each within the limit, used or not
        check_tokens(settings, getattr(body, field), field)
    max_tokens = body.max_completion_tokens or body.max_tokens or default_tokens
    params = make_params(settings, max_new_tokens=max_tokens, temperature=body.temperature,
                         top_p=body.top_p, top_k=0, seed=body.seed, stop=body.stop)
    if extra_stop:  # the template's own stops, on top of (and not counted in) the caller's
        params = dataclasses.replace(params, stop=tuple(dict.fromkeys((*params.stop,
                                                                       *extra_stop))))
    return Call(prompt=prompt, params=params, endpoint=endpoint, variant=pinned(body.model),
                stream=body.stream,
                budget=make_budget(settings, body.latency_budget_ms, body.min_quality,
                                   body.max_joules))


def _check_messages(messages: list[ChatMessage], settings: Settings) -> None:
    """The documented limits: message count, parts per message, characters per content."""
    if len(messages) > settings.max_messages:
        raise ApiError(422, "invalid_request_error", f"at most {settings.max_messages} "
                       f"messages are allowed, got {len(messages)}", "messages")
    for i, m in enumerate(messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            check_length(settings, m.content, where)
            continue
        if len(m.content) > settings.max_content_parts:
            raise ApiError(422, "invalid_request_error", f"at most "
                           f"{settings.max_content_parts} content parts are allowed, got "
                           f"{len(m.content)}", where)
        for j, part in enumerate(m.content):
            check_length(settings, part.text or "", f"{where}.{j}.text")


def _chat_prompt(template: ChatTemplate, messages: list[ChatMessage],
                 settings: Settings) -> str:
    """``messages`` rendered with the chat template; a template's own refusal (its
    ``raise_exception``, e.g. roles that must alternate) is the caller's 422."""
    _check_messages(messages, settings)
    try:
        prompt = template.render([{"role": m.role, "content": m.text} for m in messages])
    except ValueError as err:
        raise ApiError(422, "invalid_request_error", f"the model's chat template refused "
                       f"these messages: {err}", "messages") from err
    return prompt  # its length follows from the messages' limits; its tokens are checked


def _open(service: GenerationService, call: Call) -> Run:
    try:
        return service.open(call)
    except ApiError as err:
        if err.param == "variant":  # OpenAI clients name it `model`
            err.param = "model"
        raise


ChunkFn = Callable[[str, str | None, bool], dict[str, Any]]


async def _stream(run: Run, chunk: ChunkFn, recent: RecentRequests) -> AsyncIterator[str]:
    """Chunks, then ``data: [DONE]``; a failure after the start sends one
    ``{"error": {...}}`` event (as OpenAI and vLLM do) before ``[DONE]``."""
    first = True
    try:
        async for event in run.events():
            if isinstance(event, Outcome):  # last chunk: finish reason, usage and energy
                recent.add(run.call, event)  # before the chunk: a reader of the list finds it
                yield sse({**chunk("", openai_finish_reason(event.finish_reason), False),
                           "usage": _usage_json(event)})
            elif event.text or first:
                yield sse(chunk(event.text, None, first))
                first = False
    except Exception as err:
        yield sse_error(stream_error(err, run.call.id))
    yield sse("[DONE]")


def _chunks(kind: str, cid: str, created: int, run: Run) -> ChunkFn:
    """A streamed chunk of ``kind`` (``text_completion`` or ``chat.completion.chunk``: a text
    or a delta, the role in the first)."""
    def chunk(text: str, reason: str | None, first: bool) -> dict[str, Any]:
        if kind == "text_completion":
            choice: dict[str, Any] = {"text": text}
        else:
            choice = {"delta": {"content": text, **({"role": "assistant"} if first else {})}}
        return {"id": cid, "object": kind, "created": created, "model": run.route.variant,
                "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": reason}]}
    return chunk


async def _answer(stream: bool, run: Run, request: Request, chunk: ChunkFn,
                  whole: Callable[[Outcome], Completion | ChatCompletion],
                  recent: RecentRequests) -> Any:
    """SSE chunks when streaming, else one JSON body (``whole``) with usage and energy."""
    return await respond(
        run, request, _stream(run, chunk, recent) if stream else None,
        lambda o: {**whole(o).model_dump(mode="json"), "usage": _usage_json(o)},
        lambda o: recent.add(run.call, o))


@router.post("/v1/completions", response_model=None,
             responses=answers(Completion, *GENERATION_ERRORS, stream=STREAM,
                               headers=COST_HEADERS))
async def completions(body: CompletionRequest, request: Request, service: ServiceDep,
                      settings: SettingsDep, recent: RecentDep) -> Any:
    """OpenAI text completion of one prompt (raw text, no chat template)."""
    call = _call(body, check_prompt(settings, body.prompt_text), "/v1/completions", settings,
                 default_tokens=min(COMPLETION_MAX_TOKENS, settings.max_new_tokens_limit))
    run = _open(service, call)
    cid, created = f"cmpl-{call.id}", int(time.time())

    def whole(o: Outcome) -> Completion:
        return Completion(id=cid, created=created, model=o.variant, usage=_usage(o),
                          choices=[CompletionChoice(index=0, text=o.text,
                                                    finish_reason=openai_finish_reason(
                                                        o.finish_reason))])

    return await _answer(body.stream, run, request,
                         _chunks("text_completion", cid, created, run), whole, recent)


@router.post("/v1/chat/completions", response_model=None,
             responses=answers(ChatCompletion, *GENERATION_ERRORS, stream=STREAM,
                               headers=COST_HEADERS))
async def chat_completions(body: ChatRequest, request: Request, service: ServiceDep,
                           settings: SettingsDep, recent: RecentDep) -> Any:
    """OpenAI chat completion: the messages rendered with the ladder's chat template."""
    template = service.chat_template
    prompt = _chat_prompt(template, body.messages, settings)
    call = _call(body, prompt, "/v1/chat/completions", settings,
                 extra_stop=template.stop_strings)
    run = _open(service, call)
    cid, created = f"chatcmpl-{call.id}", int(time.time())

    def whole(o: Outcome) -> ChatCompletion:
        return ChatCompletion(id=cid, created=created, model=o.variant, usage=_usage(o),
                              choices=[ChatChoice(index=0,
                                                  message=AssistantMessage(content=o.text),
                                                  finish_reason=openai_finish_reason(
                                                      o.finish_reason))])

    return await _answer(body.stream, run, request,
                         _chunks("chat.completion.chunk", cid, created, run), whole, recent)


@router.get("/v1/models", response_model=ModelList,
            responses=answers(ModelList, *LADDER_ERRORS))
async def models(service: ServiceDep) -> Any:
    """``auto`` and every loaded variant."""
    created = int(time.time())
    names = ["auto", *(v.name for v in service.ladder.manifest.ordered()
                       if v.name in service.ladder.engines)]
    body = ModelList(data=[ModelCard(id=n, created=created, owned_by="greenroute",
                                     chat_template=service.chat_template.source)
                           for n in names])
    return JSONResponse(body.model_dump(mode="json"))
