"""The executor: one per process; ``route`` and ``submit`` a request, read its events.

It owns the device lane (and through it every variant's continuous batch, their slots,
cancellation, the energy ledger and the router's feedback) and knows no HTTP: it raises the
domain errors of :mod:`serving.errors` (and the router's and engine's) for ``app/`` to map.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from models.runtime.engine.base import Engine, OutputStream
from routing.policy import Budget, Decision
from routing.router import Load, Router
from serving.batch import batches_for
from serving.errors import (
    LaneFailedError,
    PowerCappedError,
    QueueFullError,
    UnknownVariantError,
    VariantUnavailableError,
)
from serving.events import Event
from serving.job import Job, JobState
from serving.lane import Lane
from serving.observer import LaneObserver
from telemetry.base import EnergyMeter


@dataclass(frozen=True)
class ExecutorConfig:
    max_batch: int = 16  # rows per variant's batch
    max_seq_tokens: int = 2048  # prompt + generated tokens per row (and the model's context)
    queue_size: int = 8  # requests waiting for a row, per lane, before 429
    prefill_token_budget: int = 512  # prompt tokens admitted per scheduling turn (>= 1 request)
    ledger_interval_s: float = 0.0  # settle energy at most this often (slow counters: NVML)
    power_cap_watts: float | None = None  # over it: shed to the cheapest variant, then refuse
    power_window_s: float = 5.0  # the window the device's power is read over (Retry-After)


class Handle:
    """A submitted request's event stream (the events: :mod:`serving.events`)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def emit(self, event: Event) -> None:
        """Deliver an event from the lane thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def next(self) -> Event:
        """The next event; the last is anything but :class:`Chunks`."""
        return await self._queue.get()


class Executor:
    """Every loaded variant on one device lane (see :mod:`serving.lane`)."""

    def __init__(self, engines: Mapping[str, Engine], known: list[str], router: Router,
                 meter: EnergyMeter, device: str, config: ExecutorConfig | None = None,
                 observer: LaneObserver | None = None,
                 power: Callable[[], float] | None = None) -> None:
        """``power``: the device's live watts (the power cap's signal; without it, no cap)."""
        self.config = config = config or ExecutorConfig()
        self.power = power
        self.engines = dict(engines)
        self.known = list(known)
        self.router = router
        self.device = device
        batches = batches_for(self.engines, config.max_batch, config.max_seq_tokens)
        self.lane = Lane(device, batches, meter, router, config.queue_size,
                         ledger_interval_s=config.ledger_interval_s,
                         prefill_token_budget=config.prefill_token_budget,
                         observer=observer)

    # -- what the app may see of the lane ------------------------------------------------------
    @property
    def failed(self) -> LaneFailedError | None:
        """Set when the device lane died (the process must be restarted)."""
        return self.lane.failed

    @property
    def alive(self) -> bool:
        return self.lane.alive

    @property
    def busy_joules(self) -> float:
        """Device joules over every busy interval so far (what requests are charged from)."""
        return self.lane.ledger.busy_joules

    def kv_bytes(self) -> dict[str, tuple[int, int]]:
        """Per variant: its KV cache's worst case (every row full) and what rows have written."""
        return {name: (b.slots.kv_bytes, b.slots.kv_written_bytes)
                for name, b in self.lane.batches.items()}

    # -- before submitting --------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per variant: how its rows run, how many are running, and for a speculative rung
        its drafted and accepted tokens since start."""
        out: dict[str, dict[str, Any]] = {}
        for name, b in self.lane.batches.items():
            s: dict[str, Any] = {"batching": b.slots.kind, "max_batch": b.rows,
                                 "running": len(b.running), "waiting": len(b.waiting)}
            engine = self.engines[name]
            runs_on = getattr(engine, "device", None)
            if runs_on is not None:  # where its sessions really run (the provider it got)
                s["device"] = runs_on
            if engine.threads is not None:  # its sessions' threads (0: draft, target differ)
                s["threads"] = engine.threads
            if engine.wide_threads:  # and its session for wide forwards
                s.update(wide_threads=engine.wide_threads, wide_from_rows=engine.wide_from_rows)
            if b.slots.speculation is not None:
                drafted, accepted = b.slots.speculation
                s.update(drafted=drafted, accepted=accepted,
                         acceptance_rate=accepted / drafted if drafted else None)
            out[name] = s
        return out

    def max_len(self, variant: str) -> int:
        return min(self.lane.batches[variant].slots.max_len, self.config.max_seq_tokens)

    def check_variant(self, name: str) -> None:
        if name not in self.known:
            raise UnknownVariantError(name, self.known)
        if name not in self.engines:
            raise VariantUnavailableError(name)

    def load(self) -> dict[str, Load]:
        return self.lane.load()

    @property
    def depth(self) -> int:
        return self.lane.depth

    def marginal_joules_per_token(self, min_quality: float, prompt_tokens: int,
                                  new_tokens: int) -> float:
        """What a request would add to this device's joules now, per token (see
        :meth:`routing.router.Router.marginal_joules_per_token`)."""
        return self.router.marginal_joules_per_token(min_quality, prompt_tokens, new_tokens,
                                                     set(self.engines), self.load())

    def power_capped(self) -> bool:
        """The device is over its power cap now."""
        cap = self.config.power_cap_watts
        return cap is not None and self.power is not None and self.power() > cap

    def route(self, budget: Budget, prompt_tokens: int, new_tokens: int,
              pinned: str | None = None, power_capped: bool = False) -> Decision:
        """The router's decision under the lane's current load (raises
        :class:`routing.policy.InfeasibleError` when the server rejects infeasible budgets)."""
        if pinned is not None:
            self.check_variant(pinned)
        return self.router.decide(budget, prompt_tokens, new_tokens, set(self.engines),
                                  self.load(), pinned, power_capped)

    def admit(self, job_for: Callable[[str], Job], budget: Budget,
              prompt_tokens: int, new_tokens: int,
              pinned: str | None = None) -> tuple[Decision, Handle]:
        """The one way in: route and queue in one step, under the lane's admission lock, so
        the load a decision read is the load its request joins (concurrent admits see each
        other). Over the power cap, the router sheds to the cheapest variant the floor allows;
        when that (or a pinned variant) is still over it with work queued, the request is
        refused (:class:`PowerCappedError`) instead of added. ``job_for(variant)`` makes
        the job once its variant is known."""
        with self.lane.admission:
            capped = self.power_capped()
            decision = self.route(budget, prompt_tokens, new_tokens, pinned, capped)
            if capped and decision.reason in ("power_cap", "pinned") and self.depth > 0:
                cap = self.config.power_cap_watts
                assert cap is not None and self.power is not None
                raise PowerCappedError(decision.variant, self.power(), cap,
                                       max(1, math.ceil(self.config.power_window_s)))
            try:
                return decision, self.submit(job_for(decision.variant))
            except QueueFullError as err:
                err.variant = decision.variant
                raise

    # -- running --------------------------------------------------------------------------------
    def submit(self, job: Job) -> Handle:
        """Queue ``job`` (call on the event loop); raises :class:`QueueFullError` at once
        when no row is free and the queue is full."""
        self.check_variant(job.variant)
        engine = self.engines[job.variant]
        engine.check_fits(len(job.prompt_ids), job.params.max_new_tokens,
                          self.max_len(job.variant))  # one of the variant's rows
        handle = Handle(job)
        out = OutputStream(engine.tokenizer, engine.eos_token_ids, job.params)
        self.lane.submit(JobState(job, out, handle.emit))
        return handle

    def stop(self, timeout_s: float) -> bool:
        """Finish running and waiting requests (up to ``timeout_s``); take nothing new."""
        return self.lane.stop(timeout_s)
