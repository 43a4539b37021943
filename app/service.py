"""Generation as a service: choose the variant, queue on its lane, stream chunks, account cost.

No HTTP here: route modules turn the events into JSON or Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from app.errors import ApiError
from app.lanes import Job, Lane, QueueFullError
from app.settings import Settings
from models.chat import ChatTemplate
from models.engine.base import Chunk, ContextOverflowError, FinishReason, GenerationParams
from models.ladder import LoadedLadder
from routing.policy import Budget as PolicyBudget
from routing.policy import InfeasibleError
from routing.router import Router
from telemetry.base import EnergyMeter, EnergyReading
from telemetry.carbon import grams_co2e
from telemetry.metrics import Metrics
from telemetry.power import PowerWindow
from telemetry.sampler import DeviceSampler

log = logging.getLogger("greenroute.requests")

STREAM_FLUSH_S = 0.005  # streamed tokens are sent in batches at most this often (seconds)


@dataclass(frozen=True)
class Budget:
    """A request's budget, server defaults filled in."""

    latency_ms: float
    min_quality: float
    max_joules: float | None = None


@dataclass
class Call:
    """One validated generation request."""

    prompt: str
    params: GenerationParams
    budget: Budget
    endpoint: str
    variant: str | None = None  # pinned variant; None means auto
    stream: bool = False  # deliver chunks as produced (else all at once: no per-token wake-ups)
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Route:
    """Which variant serves a call, and why (see ``routing/`` for the full policy)."""

    variant: str
    reason: str
    predicted_latency_ms: float | None
    predicted_joules: float | None
    candidates: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Outcome:
    """Everything known about a finished call."""

    id: str
    variant: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    energy: EnergyReading
    latency_ms: float
    queue_ms: float
    route: Route
    gco2e: float | None = None  # when GREENROUTE_GRID_GCO2_PER_KWH is set


class GenerationService:
    """Owns the loaded ladder (and its chat template), the lanes, the meter and the metrics;
    built once at start-up."""

    def __init__(self, ladder: LoadedLadder, lanes: dict[str, Lane], meter: EnergyMeter,
                 metrics: Metrics, settings: Settings, device: str, router: Router,
                 chat_template: ChatTemplate, sampler: DeviceSampler | None = None) -> None:
        self.router = router
        self.sampler = sampler  # keeps the device power/energy series current
        self.power = PowerWindow(settings.power_window_s)
        self.ladder = ladder
        self.chat_template = chat_template  # renders /v1/chat/completions messages
        self.lanes = lanes
        self.meter = meter
        self.metrics = metrics
        self.settings = settings
        self.device = device

    # -- routing ----------------------------------------------------------------------------
    def known(self, name: str) -> bool:
        return name in self.ladder.manifest.variants

    def power_capped(self) -> bool:
        cap = self.settings.power_cap_watts
        return cap is not None and self.power.watts() > cap

    def route(self, call: Call, prompt_tokens: int) -> Route:
        engines = self.ladder.engines
        if call.variant is not None:
            if not self.known(call.variant):
                raise ApiError(404, "model_not_found", f"unknown variant {call.variant!r}; "
                               f"known: auto, {', '.join(self.ladder.manifest.variants)}",
                               "variant")
            if call.variant not in engines:
                raise ApiError(503, "variant_unavailable",
                               f"variant {call.variant!r} failed to load", "variant")
        lane = self.lanes[self.device]
        wait_ms = 1000.0 * lane.depth * lane.mean_service_s
        budget = PolicyBudget(call.budget.latency_ms, call.budget.min_quality,
                              call.budget.max_joules)
        try:
            d = self.router.decide(budget, prompt_tokens, call.params.max_new_tokens,
                                   set(engines), {n: wait_ms for n in engines}, call.variant,
                                   self.power_capped())
        except InfeasibleError as err:
            self.metrics.route_decisions.labels("none", "rejected").inc()
            raise ApiError(422, "budget_unsatisfiable", str(err), "budget") from err
        if d.reason == "power_cap" and lane.depth > 0:
            # already on the cheapest variant the floor allows and still over the cap:
            # refuse queued work instead of adding to it
            retry = max(1, math.ceil(self.settings.power_window_s))
            self.metrics.requests.labels(call.endpoint, d.variant, "rejected").inc()
            raise ApiError(429, "power_cap", f"device power {self.power.watts():.1f} W is over "
                           f"the cap of {self.settings.power_cap_watts:g} W; retry in about "
                           f"{retry} s", None, {"Retry-After": str(retry)})
        self.metrics.route_decisions.labels(d.variant, d.reason).inc()
        return Route(d.variant, d.reason, d.predicted_latency_ms, d.predicted_joules,
                     [asdict(c) for c in d.candidates])

    # -- running -------------------------------------------------------------------------
    def _lane_for(self, variant: str) -> Lane:
        return self.lanes[self.device]

    def open(self, call: Call) -> Run:
        """Validate, route and queue ``call``; raise :class:`ApiError` for a caller mistake
        (4xx) or a full queue (429) before any response has started."""
        any_engine = next(iter(self.ladder.engines.values()))
        prompt_ids = any_engine.encode(call.prompt)
        if not prompt_ids:
            raise ApiError(422, "invalid_request_error", "prompt encodes to no tokens", "prompt")
        route = self.route(call, len(prompt_ids))
        engine = self.ladder.engines[route.variant]
        try:
            engine.check_fits(len(prompt_ids), call.params.max_new_tokens)
        except ContextOverflowError as err:
            raise ApiError(422, "context_length_exceeded", str(err), "max_new_tokens") from err

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def push(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        def work() -> None:
            t0 = time.perf_counter()
            push("start", t0)
            mark = self.meter.begin()
            produced = 0
            steps = 0  # decoded tokens, EOS included: the denominator of time per token
            first = last = 0.0
            held: list[Chunk] = []
            # Waking the event loop per token slows decoding on few cores and, at thousands of
            # tokens/s, queues so many callbacks that a client's disconnect is seen late: a
            # stream is flushed at most every STREAM_FLUSH_S (its first token at once), a whole
            # answer once at the end.
            flushed = -math.inf
            try:
                for chunk in engine.stream(prompt_ids, call.params, call.cancel):
                    now = time.perf_counter()
                    if chunk.token_id >= 0:
                        first = first or now
                        last = now
                        steps += 1
                    produced += int(chunk.token_id >= 0
                                    and chunk.token_id not in engine.eos_token_ids)
                    held.append(chunk)
                    if call.stream and now - flushed >= STREAM_FLUSH_S:
                        push("chunks", held)
                        held, flushed = [], now
            except Exception as err:  # reported to the waiting request, after its tokens
                reading = self.meter.end(mark)
                if held:
                    push("chunks", held)
                self._account(call, route.variant, len(prompt_ids), produced, reading,
                              first, last, steps)
                self.power.add(reading.joules)
                push("error", err)
                return
            reading = self.meter.end(mark)
            if held:
                push("chunks", held)
            self._account(call, route.variant, len(prompt_ids), produced, reading, first, last,
                          steps)
            self.power.add(reading.joules)
            if produced and not call.cancel.is_set():
                self.router.observe(route.variant, len(prompt_ids), produced,
                                    1000 * (first - t0), 1000 * reading.seconds,
                                    reading.joules)
            push("energy", reading)

        lane = self._lane_for(route.variant)
        try:
            lane.submit(Job(work, lambda: push("skipped", None), call.cancel))
        except QueueFullError as err:
            self.metrics.requests.labels(call.endpoint, route.variant, "rejected").inc()
            raise ApiError(429, "queue_full", f"the {err.device} lane is full; retry in about "
                           f"{err.retry_after_s} s", None,
                           {"Retry-After": str(err.retry_after_s)}) from err
        self.metrics.inflight.inc()
        return Run(self, call, route, len(prompt_ids), events,
                   frozenset(engine.eos_token_ids))

    def _account(self, call: Call, variant: str, prompt_tokens: int, generated: int,
                 reading: EnergyReading, first: float, last: float, steps: int) -> None:
        """Per-request cost metrics and log line, recorded even when the caller has gone away
        or the engine failed. ``first``/``last``: ``perf_counter`` times of the first and last
        decoded token (0 if none) over ``steps`` tokens. The request id rides on the
        histograms as an exemplar (never as a label)."""
        m = self.metrics
        request_id = call.id
        exemplar = {"request_id": request_id}
        if steps:
            m.ttft.labels(variant).observe(first - call.arrived, exemplar)
        if steps > 1:
            m.tpot.labels(variant).observe((last - first) / (steps - 1), exemplar)
        m.energy.labels(variant).observe(reading.joules, exemplar)
        m.power.labels(variant).observe(reading.avg_watts, exemplar)
        m.energy_total.labels(variant).inc(reading.joules)
        m.prompt_tokens.labels(variant).inc(prompt_tokens)
        m.generated_tokens.labels(variant).inc(generated)
        log.info("request %s variant=%s prompt_tokens=%d generated=%d joules=%.4f watts=%.2f "
                 "seconds=%.3f source=%s device=%s%s", request_id, variant, prompt_tokens,
                 generated, reading.joules, reading.avg_watts, reading.seconds, reading.source,
                 reading.device, f" ({reading.note})" if reading.note else "")



class Run:
    """A queued call: iterate :meth:`events` for its chunks and final :class:`Outcome`."""

    def __init__(self, service: GenerationService, call: Call, route: Route, prompt_tokens: int,
                 events: asyncio.Queue[tuple[str, Any]], eos: frozenset[int]) -> None:
        self.service = service
        self.call = call
        self.route = route
        self.prompt_tokens = prompt_tokens
        self._events = events
        self._eos = eos

    async def events(self) -> AsyncIterator[Chunk | Outcome]:
        """Chunks as produced, then one :class:`Outcome`. Raises :class:`ApiError`: 504 on
        timeout, 500 when the engine fails (after the chunks it produced; counted ``error``);
        closing the iterator early cancels the generation between tokens."""
        call, route, metrics = self.call, self.route, self.service.metrics
        timeout_s = self.service.settings.request_timeout_s
        status = "error"
        started = call.arrived
        parts: list[str] = []
        completion_tokens = 0
        finish: FinishReason = "length"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s - (time.perf_counter() - call.arrived)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        kind, payload = await self._events.get()
                except TimeoutError:
                    status = "timeout"
                    raise ApiError(504, "timeout", "generation ran past the request timeout "
                                   f"of {timeout_s:g} s") from None
                if kind == "start":
                    started = payload
                elif kind == "chunks":
                    for chunk in payload:
                        parts.append(chunk.text)
                        if chunk.token_id >= 0 and chunk.token_id not in self._eos:
                            completion_tokens += 1
                        if chunk.finish_reason:
                            finish = chunk.finish_reason
                        yield chunk
                elif kind == "skipped":
                    status = "cancelled"
                    return
                elif kind == "error":  # the engine failed: logged here, never shown
                    log.error("request %s failed on variant %s after %d tokens", call.id,
                              route.variant, completion_tokens, exc_info=payload)
                    raise ApiError(500, "internal_error", "generation failed; see the server "
                                   f"log (request {call.id})") from payload
                else:  # "energy": the run is over
                    reading: EnergyReading = payload
                    status = "cancelled" if finish == "cancelled" else "ok"
                    now = time.perf_counter()
                    metrics.duration.labels(route.variant).observe(
                        now - call.arrived, {"request_id": call.id})
                    yield Outcome(call.id, route.variant, "".join(parts), finish,
                                  self.prompt_tokens, completion_tokens, reading,
                                  1000 * (now - call.arrived), 1000 * (started - call.arrived),
                                  route, grams_co2e(reading.joules,
                                                    self.service.settings.grid_gco2_per_kwh))
                    return
        except (GeneratorExit, asyncio.CancelledError):
            status = "cancelled"
            raise
        finally:
            if status != "ok":
                call.cancel.set()  # stop decoding: nobody will read further tokens
            metrics.inflight.dec()
            metrics.requests.labels(call.endpoint, route.variant, status).inc()

    async def outcome(self) -> Outcome | None:
        """Run to the end; ``None`` if the call was cancelled before it started."""
        result: Outcome | None = None
        async for event in self.events():
            if isinstance(event, Outcome):
                result = event
        return result
