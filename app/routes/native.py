"""``POST /v1/generate`` (native) and ``GET /v1/variants``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.deps import RecentDep, ServiceDep, SettingsDep, require_api_key
from app.http_errors import sse_error, stream_error
from app.openapi import GENERATION_ERRORS, LADDER_ERRORS, answers
from app.recent import RecentRequests
from app.routes.common import (
    COST_HEADERS,
    check_prompt,
    energy_out,
    make_budget,
    make_params,
    pinned,
    respond,
    route_out,
    sse,
)
from app.schemas import (
    EnergyMeterOut,
    GenerateRequest,
    GenerateResponse,
    Usage,
    VariantList,
    VariantOut,
)
from app.service import Call, Outcome, Run

router = APIRouter(dependencies=[Depends(require_api_key)])
ENDPOINT = "/v1/generate"
STREAM = ('`{"type": "token", "index", "text", "finish_reason"}` events, then one '
          '`{"type": "done", ...}` with the JSON answer\'s fields; a failure after the start '
          'ends the stream with `{"type": "error", "error": {...}}` instead')


def response_body(o: Outcome) -> GenerateResponse:
    return GenerateResponse(
        id=o.id, text=o.text, variant=o.variant, finish_reason=o.finish_reason,
        usage=Usage(prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens),
        energy=energy_out(o), latency_ms=o.latency_ms, queue_ms=o.queue_ms, route=route_out(o))


async def _events(run: Run, recent: RecentRequests) -> AsyncIterator[str]:
    """``token`` events, then ``done``; a failure after the start ends the stream with one
    ``{"type": "error", "error": {...}}`` event instead of ``done``."""
    try:
        async for event in run.events():
            if isinstance(event, Outcome):
                recent.add(run.call, event)  # before `done`: a reader of the list finds it
                yield sse({"type": "done", **response_body(event).model_dump(mode="json")})
            elif event.text or event.finish_reason:
                yield sse({"type": "token", "index": event.index, "text": event.text,
                           "finish_reason": event.finish_reason})
    except Exception as err:
        yield sse_error(stream_error(err, run.call.id), type="error")


@router.post("/v1/generate", response_model=GenerateResponse,
             responses=answers(GenerateResponse, *GENERATION_ERRORS, stream=STREAM,
                               headers=COST_HEADERS))
async def generate(body: GenerateRequest, request: Request, service: ServiceDep,
                   settings: SettingsDep, recent: RecentDep) -> Any:
    """Generate text on the variant the router picks for the budget (or the pinned one)."""
    params = make_params(settings, max_new_tokens=body.max_new_tokens,
                         temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                         seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos)
    b = body.budget
    call = Call(prompt=check_prompt(settings, body.prompt), params=params,
                budget=make_budget(settings, b.latency_ms if b else None,
                                   b.min_quality if b else None, b.max_joules if b else None),
                endpoint=ENDPOINT, variant=pinned(body.variant), stream=body.stream)
    run = service.open(call)
    return await respond(run, request, _events(run, recent) if body.stream else None,
                         lambda o: response_body(o).model_dump(mode="json"),
                         lambda o: recent.add(call, o))


@router.get("/v1/variants", response_model=VariantList,
            responses=answers(VariantList, *LADDER_ERRORS))
async def variants(service: ServiceDep) -> Any:
    """The ladder: measured quality, size, cost calibration and load health per variant."""
    ladder = service.ladder
    live = service.router.coefficients()
    running = service.executor.stats()
    out = []
    for v in ladder.manifest.ordered():
        out.append(VariantOut(
            **v.model_dump(mode="json"),
            loaded=v.name in ladder.engines,
            error=ladder.failed.get(v.name),
            runtime=ladder.engines[v.name].runtime if v.name in ladder.engines else None,
            cost=live.get(v.name),  # current learned coefficients
            execution=running.get(v.name),  # batching, rows running, speculation counts
        ))
    meter = service.meter
    body = VariantList(
        data=out, device=service.device,
        chat_template=service.chat_template.source,
        power_watts=service.power.watts(), power_capped=service.power_capped(),
        energy_meter=EnergyMeterOut(source=meter.source, device=meter.device,
                                    estimated=meter.estimated, description=meter.describe()),
        answer_lengths=service.router.lengths())
    return JSONResponse(body.model_dump(mode="json"))
