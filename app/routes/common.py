"""Helpers shared by the native and OpenAI-compatible routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from app.http_errors import ApiError
from app.schemas import NON_BLANK, EnergyOut, RouteOut
from app.service import Outcome, Run
from app.settings import Settings
from models.runtime.engine.base import GenerationParams
from routing.policy import Budget


def check_tokens(settings: Settings, asked: int | None, field: str) -> None:
    """The server's limit on new tokens, the one place it is checked (422 naming ``field``)."""
    if asked is not None and asked > settings.max_new_tokens_limit:
        raise ApiError(422, "invalid_request_error", f"{field} must be at most "
                       f"{settings.max_new_tokens_limit}, got {asked}", field)


def make_params(settings: Settings, *, max_new_tokens: int | None, temperature: float,
                top_p: float, top_k: int, seed: int | None, stop: list[str],
                field: str = "max_new_tokens", ignore_eos: bool = False) -> GenerationParams:
    """Generation parameters with the server's limits applied (422 with the field's name)."""
    n = max_new_tokens if max_new_tokens is not None else settings.default_max_new_tokens
    check_tokens(settings, n, field)
    if len(stop) > settings.max_stop_sequences:
        raise ApiError(422, "invalid_request_error", f"at most {settings.max_stop_sequences} "
                       "stop sequences are allowed", "stop")
    if any(not s for s in stop):
        raise ApiError(422, "invalid_request_error", "stop sequences must not be empty", "stop")
    if any(len(s) > settings.max_stop_chars for s in stop):
        raise ApiError(422, "invalid_request_error", "a stop sequence is at most "
                       f"{settings.max_stop_chars} characters", "stop")
    for s in stop:
        check_text(s, "stop")
    return GenerationParams(max_new_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)


SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, field: str) -> str:
    """Text that is valid Unicode: JSON's ``\\ud800`` escapes can carry a lone UTF-16
    surrogate, which no tokenizer (and no UTF-8 encoder) accepts."""
    if SURROGATE.search(text):
        raise ApiError(422, "invalid_request_error", f"{field} contains a lone UTF-16 surrogate "
                       "(U+D800-U+DFFF escape without its pair): not valid text", field)
    return text


def check_length(settings: Settings, text: str, field: str) -> str:
    check_text(text, field)
    if len(text) > settings.max_prompt_chars:
        raise ApiError(422, "invalid_request_error", f"{field} is {len(text)} characters; "
                       f"the limit is {settings.max_prompt_chars}", field)
    return text


def check_prompt(settings: Settings, prompt: str, field: str = "prompt") -> str:
    """A prompt with a character other than ASCII whitespace (the document's pattern), within
    the length limit."""
    if not re.search(NON_BLANK, prompt):
        raise ApiError(422, "invalid_request_error", f"{field} must not be blank", field)
    return check_length(settings, prompt, field)


def make_budget(settings: Settings, latency_ms: float | None, min_quality: float | None,
                max_joules: float | None) -> Budget:
    return Budget(latency_ms if latency_ms is not None else settings.default_latency_ms,
                  min_quality if min_quality is not None else settings.default_min_quality,
                  max_joules)


def pinned(name: str | None) -> str | None:
    """``None``/``"auto"`` → routed; anything else pins that variant."""
    return None if name in (None, "", "auto") else name


async def _watch_disconnect(request: Request, run: Run) -> None:
    """Wait (no polling) for the server's ``http.disconnect``: the body is already read, so
    the next ASGI message arrives only when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.call.cancel.set()
            return


async def finish(run: Run, request: Request) -> Outcome:
    """Await a non-streaming run; a client that goes away cancels it between tokens."""
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    try:
        outcome = await run.outcome()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if outcome is None:
        raise ApiError(499, "cancelled", "request cancelled before it started")
    return outcome


def energy_split(o: Outcome) -> dict[str, Any]:
    """The answer's joules apart by phase, in the MLCommons power proposal's names."""
    e = o.energy
    generation = e.generation_joules
    return {"prefill_energy_joules": e.prefill_joules or 0.0,
            "generation_energy_joules": generation,
            "energy_per_token_joules": generation / o.completion_tokens
            if o.completion_tokens else None,
            "measurement_method": f"{e.source}{' (an estimate)' if e.estimated else ''}; "
                                  "ledger share by tokens, prompt tokens as prefill"}


def energy_out(o: Outcome) -> EnergyOut:
    e = o.energy
    return EnergyOut(joules=e.joules, avg_watts=e.avg_watts, source=e.source, device=e.device,
                     estimated=e.estimated,
                     joules_per_token=e.joules / o.completion_tokens if o.completion_tokens
                     else None, note=e.note, gco2e=o.gco2e, **energy_split(o))


def route_out(o: Outcome) -> RouteOut:
    """The router's decision as the caller sees it, with the call's budget beside it."""
    r = o.route
    return RouteOut(variant=r.variant, reason=r.reason,
                    predicted_latency_ms=r.predicted_latency_ms,
                    predicted_joules=r.predicted_joules,
                    candidates=[asdict(c) for c in r.candidates],
                    latency_budget_ms=o.budget.latency_ms, latency_met=o.latency_met,
                    max_joules=o.budget.max_joules,
                    max_joules_reached=o.finish_reason == "energy")


def cost_headers(o: Outcome) -> dict[str, str]:
    return {"X-Greenroute-Variant": o.variant,
            "X-Greenroute-Energy-Joules": f"{o.energy.joules:.6f}",
            "X-Greenroute-Energy-Source": o.energy.source,
            "X-Greenroute-Route-Reason": o.route.reason}


def sse(data: dict[str, Any] | str) -> str:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {body}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def respond(run: Run, request: Request, events: AsyncIterator[str] | None,
                  body: Callable[[Outcome], dict[str, Any]],
                  done: Callable[[Outcome], object]) -> Any:
    """Every generation endpoint's answer: the SSE ``events`` when streaming (the generation
    stopped if the client leaves before the first byte), else one JSON ``body`` of the
    outcome with the cost headers; ``done`` hears of the outcome first."""
    if events is not None:
        return StreamingResponse(events, media_type="text/event-stream",
                                 background=BackgroundTask(run.abandon),
                                 headers={**SSE_HEADERS, "X-Greenroute-Variant": run.route.variant})
    outcome = await finish(run, request)
    done(outcome)
    return JSONResponse(body(outcome), headers=cost_headers(outcome))
# the success answer's headers, as documented (energy headers: JSON answers only)
COST_HEADERS = {
    "X-Greenroute-Variant": {"description": "the variant that served the request",
                             "schema": {"type": "string"}},
    "X-Greenroute-Energy-Joules": {"description": "the request's joules (JSON answers)",
                                   "schema": {"type": "string"}},
    "X-Greenroute-Energy-Source": {"description": "the energy meter (JSON answers)",
                                   "schema": {"type": "string"}},
    "X-Greenroute-Route-Reason": {"description": "why the router chose the variant "
                                  "(JSON answers)", "schema": {"type": "string"}},
}
