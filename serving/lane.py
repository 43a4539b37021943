"""A device lane: one thread that runs every variant's continuous batch on one device.

The loop keeps three verbs apart, as vLLM's scheduler, TGI's batching task and llama.cpp's
server slots do: **schedule** (drop cancelled or expired waiters; prefill waiting requests into
free rows, at most ``prefill_token_budget`` prompt tokens a turn, a long prompt in parts where
the slots allow, so running rows are never stalled for long), **execute** (one forward over the
next variant's rows, in exact round-robin: each busy variant gets one step per turn, which the
router's timeline predicts), **update** (hand each row its token, settle energy in the ledger,
retire finished, cancelled and over-cap rows at once, feed step times to the router). Within a
variant, waiting requests are admitted first come, first served. Each request hears of itself
through its events (:mod:`serving.events`); the app through one :class:`LaneObserver`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from routing.router import Load, Router
from serving.batch import Batch
from serving.costs import ForwardCosts
from serving.errors import LaneFailedError, QueueFullError, ShuttingDownError
from serving.events import Failed, Finished, Skipped
from serving.job import JobState
from serving.load import cycle_ms, predict_load, wait_ms
from serving.observer import LaneObserver
from telemetry.base import EnergyMeter
from telemetry.ledger import EnergyLedger

log = logging.getLogger(__name__)


class Lane:
    """Runs the batches of every variant loaded on ``device`` (see the module doc)."""

    def __init__(self, device: str, batches: dict[str, Batch], meter: EnergyMeter,
                 router: Router, queue_size: int, *, ledger_interval_s: float = 0.0,
                 prefill_token_budget: int = 512, observer: LaneObserver | None = None) -> None:
        self.device = device
        self.batches = batches
        self.meter = meter
        self.router = router
        self.queue_size = queue_size
        self.ledger = EnergyLedger(meter, ledger_interval_s)
        self.prefill_token_budget = prefill_token_budget
        self.observer = observer or LaneObserver()
        self._cv = threading.Condition()
        self._inbox: list[JobState] = []
        self._waiting = 0  # submitted, not yet in a row (inbox + batches' waiting)
        self._stopping = False
        self.failed: LaneFailedError | None = None  # set when the lane thread died
        self._order = list(batches)  # round-robin order (fixed)
        self._stepped: str | None = None  # the variant whose step ran last
        self._ran: str | None = None  # the variant whose forward (step or prefill) ran last
        self.costs = ForwardCosts(self.ledger, router)  # rows' shares, router observations
        self._thread = threading.Thread(target=self._loop, name=f"lane-{device}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:  # requests waiting for a row
        return self._waiting

    @property
    def admission(self) -> threading.Condition:  # held (reentrant) by Executor.admit
        return self._cv

    def load(self) -> dict[str, Load]:  # each variant's rows for the router (serving.load)
        return predict_load(self.batches, list(self._inbox), self.router, time.perf_counter())

    def submit(self, state: JobState) -> None:
        """Queue ``state`` for a row of its variant, or raise :class:`QueueFullError` at once."""
        b = self.batches[state.job.variant]
        with self._cv:
            if self.failed is not None:
                raise self.failed
            if self._stopping:
                raise ShuttingDownError()
            mine = len(b.waiting) + sum(1 for s in self._inbox
                                        if s.job.variant == b.name)
            has_row = mine < b.rows - len(b.running)
            if not has_row and self._waiting >= self.queue_size:
                wait_s = wait_ms(b, mine, cycle_ms(self.batches, self.router)) / 1000.0
                raise QueueFullError(self.device, max(1, math.ceil(wait_s)))
            self._inbox.append(state)
            self._waiting += 1
            self._cv.notify()
        self._report(self.observer.queue_depth, self._waiting)

    @property
    def alive(self) -> bool:  # the lane thread runs (false once stopped, or dead: ``failed``)
        return self._thread.is_alive()

    def stop(self, timeout_s: float) -> bool:
        """Take nothing new; let running and waiting requests finish (up to ``timeout_s``)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _busy(self) -> bool:  # -- the loop (lane thread) -------------------------------------
        return bool(self._inbox) or any(b.running or b.waiting for b in self.batches.values())

    def _loop(self) -> None:
        """The lane thread: the loop, supervised. An error inside one step fails that step's
        rows (below); one anywhere else (the meter, the ledger, the lane's own bookkeeping)
        kills the lane: everything it holds is failed with :class:`LaneFailedError`, it takes
        nothing new, and ``failed`` tells the health check."""
        try:
            self._run()
        except BaseException as err:  # noqa: BLE001 (the lane's last word, whatever it was)
            log.exception("lane %s died", self.device)
            self._die(err)

    def _die(self, err: BaseException) -> None:
        failure = LaneFailedError(self.device, err)
        with self._cv:
            self.failed = failure
            held = list(self._inbox)
            self._inbox.clear()
            self._waiting = 0
        for b in self.batches.values():
            held += list(b.waiting) + list(b.running.values())
            b.waiting.clear()
            b.running.clear()
        for state in held:
            try:
                state.flush(time.perf_counter())
                state.emit(Failed(failure))
            except Exception:  # noqa: BLE001 (one consumer's failure must not keep others)
                log.exception("could not fail request %s", state.id)
        self._report(self.observer.queue_depth, 0)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._busy():
                    self.costs.idle()
                    if self._stopping:
                        return
                    self._cv.wait()
                for state in self._inbox:
                    self.batches[state.job.variant].waiting.append(state)
                self._inbox.clear()
            self.ledger.open()
            try:
                self._schedule()
                batch = self._next_batch()
                if batch is not None:
                    self._execute(batch)
            except Exception:  # a bug here must not kill the lane: fail what is running
                log.exception("lane %s failed", self.device)
                for b in self.batches.values():
                    for row in list(b.running):
                        self._fail(b, row, RuntimeError("the lane failed"))

    def _schedule(self) -> None:
        """Drop cancelled or expired waiters; go on with prompts being prefilled, then admit
        waiting requests into free rows. At most ``prefill_token_budget`` prompt tokens a turn
        (a long prompt is prefilled in parts over several turns, where the variant's graph
        allows, so running rows never wait for more than one part), at least one part."""
        budget = self.prefill_token_budget
        first = True
        now = time.perf_counter()
        for b in self.batches.values():
            for row, state in list(b.running.items()):  # prompts part-way in, oldest first
                if state.ready:
                    continue
                if state.job.expired(now):
                    state.end("cancelled", now)
                    self._retire(b, row)
                elif first or budget > 0:
                    budget = self._prefill(b, state, budget, first)
                    first = False
            while b.waiting and b.waiting[0].job.expired(now):
                self._dequeue(b).emit(Skipped())
            while b.waiting and b.has_free and (first or budget > 0):
                state = b.waiting[0]
                if state.job.expired(now):
                    self._dequeue(b).emit(Skipped())
                    continue
                if not b.slots.chunked and not first and len(state.job.prompt_ids) > budget:
                    break  # a one-piece prefill waits for a turn of its own
                self._dequeue(b)
                row = b.take_row()
                state.row = row
                b.running[row] = state
                self._report(self.observer.batch_size, b.name, len(b.running))
                state.admitted = time.perf_counter()
                budget = self._prefill(b, state, budget, first)
                first = False

    def _dequeue(self, b: Batch) -> JobState:
        state = b.waiting.popleft()
        with self._cv:
            self._waiting -= 1
        self._report(self.observer.queue_depth, self._waiting)
        return state

    def _prefill(self, b: Batch, state: JobState, budget: int, first: bool) -> int:
        """Put the next part of ``state``'s prompt in its row (the whole prompt where the slots
        cannot take parts); the last part gives its first token. Returns the budget left."""
        prompt = state.job.prompt_ids
        start = state.prefilled
        end = (min(len(prompt), start + max(budget, 1 if first else 0)) if b.slots.chunked
               else len(prompt))
        t0 = time.perf_counter()
        try:
            token = b.slots.prefill_part(state.row, prompt[start:end], state.sampler,
                                         final=end == len(prompt))
        except Exception as err:
            self._fail(b, state.row, err)
            return budget - (end - start)
        now = time.perf_counter()
        state.prefilled = end
        self._ran = b.name
        self.costs.prefill(b.name, state.id, end - start, now - t0)
        if token is not None:
            self._update([(b, [state], [[token]])], now)
        else:
            self.costs.settle()
        return budget - (end - start)

    def _next_batch(self) -> Batch | None:
        """Exact round-robin: the first busy variant after the one stepped last, in a fixed
        order (variants joining or leaving never shift whose turn it is)."""
        n = len(self._order)
        start = self._order.index(self._stepped) + 1 if self._stepped in self.batches else 0
        for i in range(n):
            b = self.batches[self._order[(start + i) % n]]
            if any(state.ready for state in b.running.values()):  # not only prompts part-way in
                return b
        return None

    def _execute(self, b: Batch) -> None:
        """One step of ``b``'s running rows (and of the rows riding along it), then update."""
        now = time.perf_counter()
        for row, state in list(b.running.items()):  # cancelled or timed out: retire
            if state.job.expired(now):
                state.end("cancelled", now)
                self._retire(b, row)
        if not b.running:
            return
        rows = sorted(r for r, state in b.running.items() if state.ready)
        if not rows:  # only prompts part-way in
            return
        states = [b.running[r] for r in rows]
        carried = self.batches[b.rides] if b.rides is not None else b
        riders = carried.riders(now) if carried is not b else None
        t0 = time.perf_counter()
        try:
            result = b.slots.step_many(rows, [s.last_token for s in states],
                                       [s.sampler for s in states],
                                       **({"riders": riders} if riders else {}))
        except Exception as err:
            for batch, failing in ((b, rows), (carried, riders.rows if riders else [])):
                for row in failing:
                    self._fail(batch, row, err)
            return
        now = time.perf_counter()
        width = rows[-1] + 1 if b.slots.batched else len(rows)  # what the forward covered
        tokens, work, failed = result.tokens, result.work, result.failed
        if failed:  # rows with bad logits fail alone; the others go on
            for i, row in enumerate(rows):
                if row in failed:
                    self.ledger.record(states[i].id, work[i])  # its share of the step
                    self._fail(b, row, failed[row])
            kept = [i for i, r in enumerate(rows) if r not in failed]
            rows, states, tokens, work = ([rows[i] for i in kept], [states[i] for i in kept],
                                        [tokens[i] for i in kept], [work[i] for i in kept])
        groups = [(b, states, tokens)]
        own = 1.0 - min(1.0, result.rider_seconds / max(now - t0, 1e-9))  # riders' apart
        if riders:  # their tokens' share of the draft steps, then the same as their own steps
            took = [(carried.running[r], t) for r, t in zip(riders.rows, result.riders,
                                                            strict=True)]
            for state, mine in took:
                self.ledger.record(state.id, len(mine))
            for row, why in result.riders_failed.items():
                self._fail(carried, row, why)
            took = [(st, t) for st, t in took if st.row not in result.riders_failed and t]
            groups.append((carried, [st for st, _ in took], [t for _, t in took]))
        if rows:  # the width is what the forward covered (a batched step runs over the prefix
            # of rows up to the highest one); the router learns the rung's own share of it
            self.costs.step(b.name, width, now - t0, [s.id for s in states], work,
                            sum(len(t) for t in tokens) / len(rows),
                            switched=self._ran not in (None, b.name), own=own)
            self._ran = self._stepped = b.name
            if (speculated := b.new_speculation()) is not None:
                self._report(self.observer.speculated, b.name, *speculated)
        self._update(groups, now)

    def _update(self, groups: list[tuple[Batch, list[JobState], list[list[int]]]],
                now: float) -> None:
        """Hand each row its token(s), settle the interval (so it covers this work too), then
        retire the rows that ended or reached their energy cap."""
        ended: list[tuple[Batch, JobState]] = []
        for b, states, tokens in groups:
            for state, mine in zip(states, tokens, strict=True):
                for token in mine:  # a row's tokens past its end are dropped with its row
                    if state.push(token, now).finish_reason is not None:
                        ended.append((b, state))
                        break
        self.costs.settle()
        done = {id(s) for _, s in ended}
        for b, states, _ in groups:
            for state in states:
                cap = state.job.max_joules
                if id(state) in done or cap is None or self.ledger.joules(state.id) < cap:
                    continue
                state.end("energy", now)
                ended.append((b, state))
        for b, state in ended:
            self._retire(b, state.row)

    def _retire(self, b: Batch, row: int) -> None:
        """Free the row at once; report the sequence's energy and timing."""
        state, finished = self._release(b, row)
        if finished.finish_reason in ("stop", "length"):  # it ended by itself: its length
            self.router.observe_length(state.job.params.max_new_tokens, finished.steps)
        state.emit(finished)

    def _fail(self, b: Batch, row: int, err: Exception) -> None:
        """The runtime failed on this row: its tokens so far, then the error (cost kept)."""
        state, _ = self._release(b, row)
        state.flush(time.perf_counter())
        state.emit(Failed(err))

    def _release(self, b: Batch, row: int) -> tuple[JobState, Finished]:
        state = b.running.pop(row)
        b.slots.release(row)
        b.give_row(row)
        self._report(self.observer.batch_size, b.name, len(b.running))
        seconds = time.perf_counter() - state.admitted
        finished = state.finished(self.ledger.reading(state.id, seconds))
        self._report(self.observer.request_finished, state.job, finished)
        return state, finished

    @staticmethod
    def _report(method: Callable[..., None], *args: object) -> None:
        """Tell the observer; its failure is logged, never allowed to stop serving."""
        try:
            method(*args)
        except Exception:  # noqa: BLE001 (metrics must not break serving)
            log.exception("lane observer failed in %s", method.__name__)

