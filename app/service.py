"""Generation as a service: route the call, submit it to the executor, turn its events into
chunks and an :class:`Outcome`, and account its cost in the metrics.

No HTTP here (route modules turn the events into JSON or Server-Sent Events), and no execution
either: lanes, batches, slots and the energy ledger live in ``serving/``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from app.http_errors import ApiError
from app.settings import Settings
from models.runtime.chat import ChatTemplate
from models.runtime.engine.base import Chunk, ContextOverflowError, FinishReason, GenerationParams
from models.runtime.ladder import LoadedLadder
from routing.policy import Budget, Decision, InfeasibleError
from routing.router import Router
from serving.errors import (
    LaneFailedError,
    PowerCappedError,
    QueueFullError,
    ShuttingDownError,
    UnknownVariantError,
    VariantUnavailableError,
)
from serving.events import Chunks, Failed, Finished, Skipped
from serving.executor import Executor, Handle
from serving.job import Job
from telemetry.base import EnergyMeter, EnergyReading
from telemetry.carbon import grams_co2e
from telemetry.metrics import Metrics
from telemetry.power import LivePower
from telemetry.sampler import DeviceSampler

log = logging.getLogger("greenroute.requests")
MARGINAL_FLOORS = (0.0, 1.0)  # the marginal-joules gauge's floors: any rung, full's output
MARGINAL_REQUEST = (64, 128)  # and its reference request: prompt tokens, new tokens

@dataclass
class Call:
    """One validated generation request, as the HTTP layer hands it over; :meth:`job` is the
    one place it becomes the executor's :class:`Job`."""

    prompt: str
    params: GenerationParams
    budget: Budget  # server defaults filled in
    endpoint: str
    variant: str | None = None  # pinned variant; None means auto
    stream: bool = False  # deliver chunks as produced (else all at once: no per-token wake-ups)
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def job(self, prompt_ids: list[int], variant: str, timeout_s: float) -> Job:
        """What the executor runs: its tokens on the routed ``variant``, sharing this call's
        id, arrival time and cancellation event."""
        return Job(prompt_ids, self.params, variant, self.budget.max_joules, self.stream,
                   self.cancel, self.arrived, self.id, self.budget.latency_ms,
                   self.arrived + timeout_s)


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
    route: Decision  # the router's, as the executor admitted the call
    budget: Budget  # the call's, server defaults filled in
    gco2e: float | None = None  # when GREENROUTE_GRID_GCO2_PER_KWH is set

    @property
    def latency_met(self) -> bool:
        """Whether the end-to-end latency fitted the budget (a routing target, not a cap)."""
        return self.latency_ms <= self.budget.latency_ms


class GenerationService:
    """Owns the loaded ladder (and its chat template), the executor, the meter and the
    metrics; built once at start-up."""

    def __init__(self, ladder: LoadedLadder, executor: Executor, meter: EnergyMeter,
                 metrics: Metrics, settings: Settings, device: str, router: Router,
                 chat_template: ChatTemplate, power: LivePower,
                 sampler: DeviceSampler | None = None) -> None:
        self.router = router
        self.sampler = sampler  # keeps the device power/energy series current
        self.power = power  # the device's live measured power (the cap's signal)
        self.ladder = ladder
        self.chat_template = chat_template  # renders /v1/chat/completions messages
        self.executor = executor
        self.meter = meter
        self.metrics = metrics
        self.settings = settings
        self.device = device
        self._busy_counted = 0.0  # ledger busy joules already added to the counter

    @property
    def lane_failed(self) -> LaneFailedError | None:
        """Set when the device lane died (the process must be restarted)."""
        return self.executor.failed

    def refresh_energy_metrics(self) -> None:
        """Bring the device energy counters up to now: the meter's total (idle included) and
        the ledger's busy joules (what requests are charged from)."""
        if self.sampler is not None:
            self.sampler.sample()
        busy = self.executor.busy_joules
        counted = self._busy_counted
        if busy > counted:
            self.metrics.device_busy_energy.labels(self.meter.device, self.meter.source).inc(
                busy - counted)
            self._busy_counted = busy

    def refresh_memory_metrics(self) -> None:
        """Each variant's KV cache: what it may take and what its rows have written."""
        for name, (capacity, written) in self.executor.kv_bytes().items():
            self.metrics.kv_capacity.labels(name).set(capacity)
            self.metrics.kv_written.labels(name).set(written)

    def refresh_routing_metrics(self) -> None:
        """The marginal joules per token a new request would pay here now, at each floor."""
        for floor in MARGINAL_FLOORS:
            self.metrics.marginal_jpt.labels(f"{floor:g}").set(
                self.executor.marginal_joules_per_token(floor, *MARGINAL_REQUEST))

    def power_capped(self) -> bool:
        return self.executor.power_capped()

    # -- running -------------------------------------------------------------------------
    def open(self, call: Call) -> Run:
        """Validate ``call`` and admit it (routed and queued in one step by the executor);
        map a refusal to :class:`ApiError` (4xx, 429, 503) before any response has started."""
        any_engine = next(iter(self.ladder.engines.values()))
        prompt_ids = any_engine.encode(call.prompt)
        if not prompt_ids:
            raise ApiError(422, "invalid_request_error", "prompt encodes to no tokens", "prompt")
        timeout = self.settings.request_timeout_s
        try:
            d, handle = self.executor.admit(
                lambda variant: call.job(prompt_ids, variant, timeout), call.budget,
                len(prompt_ids), call.params.max_new_tokens, call.variant)
        except UnknownVariantError as err:
            raise ApiError(404, "model_not_found", str(err), "variant") from err
        except VariantUnavailableError as err:
            raise ApiError(503, "variant_unavailable", str(err), "variant") from err
        except InfeasibleError as err:
            self.metrics.route_decisions.labels("none", "rejected").inc()
            raise ApiError(422, "budget_unsatisfiable", str(err), "budget") from err
        except PowerCappedError as err:
            self.metrics.requests.labels(call.endpoint, err.variant, "rejected").inc()
            raise ApiError(429, "power_cap", str(err), None,
                           {"Retry-After": str(err.retry_after_s)}) from err
        except ContextOverflowError as err:
            raise ApiError(422, "context_length_exceeded", str(err), "max_new_tokens") from err
        except QueueFullError as err:
            self.metrics.requests.labels(call.endpoint, err.variant or "auto", "rejected").inc()
            raise ApiError(429, "queue_full", str(err), None,
                           {"Retry-After": str(err.retry_after_s)}) from err
        except ShuttingDownError as err:
            raise ApiError(503, "shutting_down", str(err)) from err
        except LaneFailedError as err:
            raise ApiError(503, "lane_failed", str(err)) from err
        self.metrics.route_decisions.labels(d.variant, d.reason).inc()
        self.metrics.inflight.inc()
        return Run(self, call, d, len(prompt_ids), handle)


class Run:
    """A submitted call: iterate :meth:`events` for its chunks and final :class:`Outcome`."""

    def __init__(self, service: GenerationService, call: Call, route: Decision,
                 prompt_tokens: int, handle: Handle) -> None:
        self.service = service
        self.call = call
        self.route = route
        self.prompt_tokens = prompt_tokens
        self._handle = handle
        self._started = False  # events() began: its finally settles the call

    def abandon(self) -> None:
        """The response ended without :meth:`events` ever starting (a stream's client left
        before the first byte): stop the generation and settle the call's gauges. Runs as the
        streaming response's background task; a no-op when events() ran."""
        if self._started:
            return
        self._started = True
        self._settle("cancelled")

    def _settle(self, status: str) -> None:
        """The call is over: stop decoding unless it finished, count it, drop it from the
        in-flight gauge."""
        if status != "ok":
            self.call.cancel.set()  # stop decoding: nobody will read further tokens
        metrics = self.service.metrics
        metrics.inflight.dec()
        metrics.requests.labels(self.call.endpoint, self.route.variant, status).inc()

    async def events(self) -> AsyncIterator[Chunk | Outcome]:
        """Chunks as produced, then one :class:`Outcome`. Raises :class:`ApiError`: 504 on
        timeout, 500 when the engine fails (after the chunks it produced; counted ``error``);
        closing the iterator early cancels the generation between steps."""
        if self._started:
            raise RuntimeError("a run's events are read once")
        self._started = True
        call, route, metrics = self.call, self.route, self.service.metrics
        timeout_s = self.service.settings.request_timeout_s
        status = "error"
        parts: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s - (time.perf_counter() - call.arrived)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await self._handle.next()
                except TimeoutError:
                    status = "timeout"
                    raise ApiError(504, "timeout", "generation ran past the request timeout "
                                   f"of {timeout_s:g} s") from None
                if isinstance(event, Chunks):
                    for chunk in event.chunks:
                        parts.append(chunk.text)
                        yield chunk
                elif isinstance(event, Skipped):
                    status = "cancelled"
                    return
                elif isinstance(event, Failed) and isinstance(event.error, LaneFailedError):
                    status = "error"
                    raise ApiError(503, "lane_failed", str(event.error)) from event.error
                elif isinstance(event, Failed):  # the engine failed: logged, never shown
                    log.error("request %s failed on variant %s", call.id, route.variant,
                              exc_info=event.error)
                    raise ApiError(500, "internal_error", "generation failed; see the server "
                                   f"log (request {call.id})") from event.error
                else:
                    f: Finished = event
                    status = "cancelled" if f.finish_reason == "cancelled" else "ok"
                    now = time.perf_counter()
                    metrics.duration.labels(route.variant).observe(
                        now - call.arrived, {"request_id": call.id})
                    yield Outcome(call.id, route.variant, "".join(parts), f.finish_reason,
                                  f.prompt_tokens, f.completion_tokens, f.energy,
                                  1000 * (now - call.arrived), 1000 * (f.admitted - call.arrived),
                                  route, call.budget, grams_co2e(
                                      f.energy.joules, self.service.settings.grid_gco2_per_kwh))
                    return
        except (GeneratorExit, asyncio.CancelledError):
            status = "cancelled"
            raise
        finally:
            self._settle(status)

    async def outcome(self) -> Outcome | None:
        """Run to the end; ``None`` if the call was cancelled before it started."""
        result: Outcome | None = None
        async for event in self.events():
            if isinstance(event, Outcome):
                result = event
        return result
