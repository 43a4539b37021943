"""A device lane: one thread that runs every variant's continuous batch on one device.

The loop keeps three verbs apart (as vLLM's scheduler, TGI's batching task and llama.cpp's
server slots do):

* **schedule** — drop cancelled waiters; admit waiting requests into free rows of their
  variant's batch (each admission is one prefill; at most ``prefill_token_budget`` prompt
  tokens per turn, at least one request, so running rows are not stalled for long); pick the
  next variant to step, round-robin over the variants with running rows;
* **execute** — one forward over that variant's rows (``Slots.step``);
* **update** — hand each row its token, settle energy in the ledger, retire finished, cancelled
  and over-cap rows (freeing their rows at once), and feed step times to the router.

Fairness between variants: round-robin by step, so each busy variant gets one step per turn
and a request's time per token is its own step plus one step of every other busy variant
(the router predicts exactly that). Within a variant, waiting requests are admitted first come
first served.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from models.engine.slots import Slots
from routing.router import Load, Router
from serving.errors import LaneFailedError, QueueFullError, ShuttingDownError
from serving.sequence import Finished, Sequence
from telemetry.base import EnergyMeter, EnergyReading
from telemetry.ledger import EnergyLedger

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One variant's continuous batch: its slots, running rows and waiting requests."""

    name: str
    slots: Slots
    running: dict[int, Sequence] = field(default_factory=dict)  # row → sequence
    waiting: deque[Sequence] = field(default_factory=deque)
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(range(self.slots.max_batch - 1, -1, -1))  # pop() gives the lowest

    def take_row(self) -> int:
        # lowest free row first: the step's prefix of rows stays short
        self.free.sort(reverse=True)
        return self.free.pop()


class Lane:
    """Runs the batches of every variant loaded on ``device`` (see the module doc)."""

    def __init__(self, device: str, batches: dict[str, Batch], meter: EnergyMeter,
                 router: Router, queue_size: int, *, ledger_interval_s: float = 0.0,
                 prefill_token_budget: int = 512,
                 on_finished: Callable[[Sequence, Finished], None] | None = None,
                 on_occupancy: Callable[[str, int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_speculation: Callable[[str, int, int], None] | None = None) -> None:
        self.device = device
        self.batches = batches
        self.meter = meter
        self.router = router
        self.queue_size = queue_size
        self.ledger = EnergyLedger(meter, ledger_interval_s)
        self.prefill_token_budget = prefill_token_budget
        self._on_finished = on_finished or (lambda _s, _f: None)
        self._on_occupancy = on_occupancy or (lambda _v, _n: None)
        self._on_depth = on_depth or (lambda _d: None)
        self._on_speculation = on_speculation or (lambda _v, _d, _a: None)
        self._speculated: dict[str, tuple[int, int]] = {}  # reported (drafted, accepted)
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._waiting = 0  # submitted, not yet in a row (inbox + batches' waiting)
        self._stopping = False
        self.failed: LaneFailedError | None = None  # set when the lane thread died
        self._order = list(batches)  # round-robin order (fixed)
        self._stepped: str | None = None  # the variant whose step ran last
        self._ran: str | None = None  # the variant whose forward (step or prefill) ran last
        self._variant_in_interval: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name=f"lane-{device}", daemon=True)
        self._thread.start()

    # -- called from the event loop ------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Requests waiting for a row."""
        return self._waiting

    def load(self) -> dict[str, Load]:
        """Each variant's rows for the router: running ones and those submitted (they will be
        in the batch by the time a new request joins it), each with its tokens left and the
        ms left to its latency budget, plus the predicted wait for a free row (approximate:
        read without stopping the loop)."""
        now = time.perf_counter()
        pending: dict[str, list[Sequence]] = {}
        for s in list(self._inbox):
            pending.setdefault(s.request.variant, []).append(s)
        out = {}
        for name, b in self.batches.items():
            running = list(b.running.values())
            waiting = list(b.waiting) + pending.get(name, [])
            if not running and not waiting:
                continue
            seqs = running + waiting
            rows = list(b.running)
            holes = max(rows) + 1 - len(rows) if rows else 0
            out[name] = Load(tuple(max(0, s.remaining) for s in seqs),
                             tuple(s.request.slack_ms(now) for s in seqs),
                             self._wait_ms(b, len(waiting)),
                             max(0, holes - len(waiting)) if b.slots.batched else 0)
        return out

    def _cycle_ms(self) -> float:
        """One round-robin turn: a step of every busy variant."""
        return sum(self.router.step_ms(n, len(b.running)) for n, b in self.batches.items()
                   if b.running)

    def _wait_ms(self, b: Batch, waiting: int) -> float:
        """Predicted wait for a row of ``b`` behind ``waiting`` others."""
        free = b.slots.max_batch - len(b.running)
        if waiting < free:
            return 0.0
        remaining = sorted(s.remaining for s in list(b.running.values())) or [0]
        ahead = waiting - free
        return remaining[min(ahead, len(remaining) - 1)] * self._cycle_ms()

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq`` for a row of its variant, or raise :class:`QueueFullError` at once."""
        b = self.batches[seq.request.variant]
        with self._cv:
            if self.failed is not None:
                raise self.failed
            if self._stopping:
                raise ShuttingDownError()
            mine = len(b.waiting) + sum(1 for s in self._inbox
                                        if s.request.variant == b.name)
            has_row = mine < b.slots.max_batch - len(b.running)
            if not has_row and self._waiting >= self.queue_size:
                wait_s = self._wait_ms(b, mine) / 1000.0
                raise QueueFullError(self.device, max(1, math.ceil(wait_s)))
            self._inbox.append(seq)
            self._waiting += 1
            self._cv.notify()
        self._on_depth(self._waiting)

    @property
    def alive(self) -> bool:
        """The lane thread runs (false once stopped, or dead: see :attr:`failed`)."""
        return self._thread.is_alive()

    def stop(self, timeout_s: float) -> bool:
        """Take nothing new; let running and waiting requests finish (up to ``timeout_s``)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the loop (lane thread) ----------------------------------------------------------------
    def _busy(self) -> bool:
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
        for seq in held:
            try:
                seq.flush(time.perf_counter())
                seq.emit("error", failure)
            except Exception:  # noqa: BLE001 (one consumer's failure must not keep others)
                log.exception("could not fail request %s", seq.id)
        self._on_depth(0)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._busy():
                    if self.ledger.is_open:  # run dry: idle time is nobody's
                        self.ledger.close()
                        self._variant_in_interval.clear()
                    if self._stopping:
                        return
                    self._cv.wait()
                for seq in self._inbox:
                    self.batches[seq.request.variant].waiting.append(seq)
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
            for row, seq in list(b.running.items()):  # prompts part-way in, oldest first
                if seq.ready:
                    continue
                if seq.request.expired(now):
                    seq.end("cancelled", now)
                    self._retire(b, row)
                elif first or budget > 0:
                    budget = self._prefill(b, seq, budget, first)
                    first = False
            while b.waiting and b.waiting[0].request.expired(now):
                self._dequeue(b).emit("skipped", None)
            while b.waiting and b.free and (first or budget > 0):
                seq = b.waiting[0]
                if seq.request.expired(now):
                    self._dequeue(b).emit("skipped", None)
                    continue
                if not b.slots.chunked and not first and len(seq.request.prompt_ids) > budget:
                    break  # a one-piece prefill waits for a turn of its own
                self._dequeue(b)
                row = b.take_row()
                seq.row = row
                b.running[row] = seq
                self._on_occupancy(b.name, len(b.running))
                seq.admitted = time.perf_counter()
                budget = self._prefill(b, seq, budget, first)
                first = False

    def _dequeue(self, b: Batch) -> Sequence:
        seq = b.waiting.popleft()
        with self._cv:
            self._waiting -= 1
        self._on_depth(self._waiting)
        return seq

    def _prefill(self, b: Batch, seq: Sequence, budget: int, first: bool) -> int:
        """Put the next part of ``seq``'s prompt in its row (the whole prompt where the slots
        cannot take parts); the last part gives its first token. Returns the budget left."""
        prompt = seq.request.prompt_ids
        start = seq.prefilled
        end = (min(len(prompt), start + max(budget, 1 if first else 0)) if b.slots.chunked
               else len(prompt))
        t0 = time.perf_counter()
        try:
            token = b.slots.prefill_part(seq.row, prompt[start:end], seq.sampler,
                                         final=end == len(prompt))
        except Exception as err:
            self._fail(b, seq.row, err)
            return budget - (end - start)
        now = time.perf_counter()
        seq.prefilled = end
        self._ran = b.name
        self.router.observe_prefill(b.name, end - start, 1000 * (now - t0))
        self.ledger.record(seq.id, end - start)
        self._variant_in_interval.add(b.name)
        if token is not None:
            self._update(b, [seq], [[token]], now)
        else:
            self._settle()
        return budget - (end - start)

    def _next_batch(self) -> Batch | None:
        """Exact round-robin: the first busy variant after the one stepped last, in a fixed
        order (variants joining or leaving never shift whose turn it is)."""
        n = len(self._order)
        start = self._order.index(self._stepped) + 1 if self._stepped in self.batches else 0
        for i in range(n):
            b = self.batches[self._order[(start + i) % n]]
            if any(seq.ready for seq in b.running.values()):  # not only prompts part-way in
                return b
        return None

    def _execute(self, b: Batch) -> None:
        """One step of ``b``'s running rows, then update."""
        now = time.perf_counter()
        for row, seq in list(b.running.items()):  # cancelled or timed out: retire
            if seq.request.expired(now):
                seq.end("cancelled", now)
                self._retire(b, row)
        if not b.running:
            return
        rows = sorted(r for r, seq in b.running.items() if seq.ready)
        if not rows:  # only prompts part-way in
            return
        seqs = [b.running[r] for r in rows]
        t0 = time.perf_counter()
        try:
            tokens = b.slots.step_many(rows, [s.last_token for s in seqs],
                                       [s.sampler for s in seqs])
        except Exception as err:
            for row in rows:
                self._fail(b, row, err)
            return
        now = time.perf_counter()
        width = rows[-1] + 1 if b.slots.batched else len(rows)  # what the forward covered
        if b.slots.failed:  # rows with bad logits fail alone; the others go on
            for i, row in enumerate(rows):
                if row in b.slots.failed:
                    self.ledger.record(seqs[i].id, b.slots.work[i])  # its share of the step
                    self._fail(b, row, b.slots.failed[row])
            kept = [i for i, r in enumerate(rows) if r not in b.slots.failed]
            work = [b.slots.work[i] for i in kept]
            rows, seqs, tokens = ([rows[i] for i in kept], [seqs[i] for i in kept],
                                  [tokens[i] for i in kept])
            if not rows:
                return
        else:
            work = b.slots.work
        # per token: a speculative step gives a row several; the width is what the forward
        # covered (a batched step runs over the prefix of rows up to the highest one)
        per_row = sum(len(t) for t in tokens) / len(rows)
        self.router.observe_step(b.name, width, 1000 * (now - t0) / per_row,
                                 switched=self._ran not in (None, b.name))
        self._ran = self._stepped = b.name
        for seq, done in zip(seqs, work, strict=True):
            self.ledger.record(seq.id, done)
        drafted = getattr(b.slots, "drafted", None)
        if drafted is not None:  # a speculative rung: report its new counts
            accepted = b.slots.accepted  # type: ignore[attr-defined]
            d0, a0 = self._speculated.get(b.name, (0, 0))
            self._on_speculation(b.name, drafted - d0, accepted - a0)
            self._speculated[b.name] = (drafted, accepted)
        self._variant_in_interval.add(b.name)
        self._update(b, seqs, tokens, now)

    def _update(self, b: Batch, seqs: list[Sequence], tokens: list[list[int]],
                now: float) -> None:
        """Hand each row its token(s), settle the interval (so it covers this work too), then
        retire the rows that ended or reached their energy cap."""
        ended = []
        for seq, mine in zip(seqs, tokens, strict=True):
            for token in mine:  # a row's tokens past its end are dropped with its row
                if seq.push(token, now).finish_reason is not None:
                    ended.append(seq)
                    break
        self._settle()
        for seq in seqs:
            cap = seq.request.max_joules
            if seq in ended or cap is None or self.ledger.joules(seq.id) < cap:
                continue
            seq.end("energy", now)
            ended.append(seq)
        for seq in ended:
            self._retire(b, seq.row)

    def _settle(self, force: bool = False) -> None:
        settled = self.ledger.settle(force)
        if settled is not None:
            if len(self._variant_in_interval) == 1:  # the interval's power is that variant's
                self.router.observe_power(next(iter(self._variant_in_interval)), *settled)
            self._variant_in_interval.clear()

    def _retire(self, b: Batch, row: int) -> None:
        """Free the row at once; report the sequence's energy and timing."""
        seq, finished = self._release(b, row)
        seq.emit("finished", finished)

    def _fail(self, b: Batch, row: int, err: Exception) -> None:
        """The runtime failed on this row: its tokens so far, then the error (its cost is
        still accounted)."""
        seq, _ = self._release(b, row)
        seq.flush(time.perf_counter())
        seq.emit("error", err)

    def _release(self, b: Batch, row: int) -> tuple[Sequence, Finished]:
        seq = b.running.pop(row)
        b.slots.release(row)
        b.free.append(row)
        self._on_occupancy(b.name, len(b.running))
        now = time.perf_counter()
        seconds = now - seq.admitted
        joules = self.ledger.take(seq.id)
        m = self.meter
        reading = EnergyReading(joules, seconds, m.source, m.device, m.estimated,
                                _note(m, joules, seconds))
        out = seq.out
        finished = Finished(out.finish_reason or "length", len(seq.request.prompt_ids),
                            out.produced, out.index + 1, reading, seq.admitted, seq.first_token,
                            seq.last_time)
        try:
            self._on_finished(seq, finished)
        except Exception:  # metrics must not break serving
            log.exception("finish hook failed for request %s", seq.id)
        return seq, finished


def _note(meter: EnergyMeter, joules: float, seconds: float) -> str:
    """How a request's number came about: the ledger share, and the meter's own note."""
    own = meter.note(joules, seconds)
    share = "ledger share of the device's energy, split by tokens among the rows of each step"
    return f"{share}; {own}" if own else share
