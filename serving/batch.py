"""One variant's continuous batch as the lane holds it."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from models.runtime.engine.base import Engine
from models.runtime.engine.kvslots import KVSlots
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.rows import Riders, RowPool
from models.runtime.engine.slots import Slots, slots_for
from models.runtime.engine.speculative import SpeculativeEngine
from serving.job import JobState


@dataclass
class Batch:
    """One variant's continuous batch: its slots, running rows and waiting requests.

    ``rows``: the most rows it runs (its slots' ``max_batch`` unless said). ``pool``: where its
    rows come from, its own unless it shares its KV buffer with a speculative rung's draft rows
    (then the buffer holds both batches' rows and each batch still runs at most ``rows``).
    ``rides``: for a speculative rung whose draft is a loaded rung on the same buffer, that
    rung's name: its ready rows ride along the speculative rung's draft steps."""

    name: str
    slots: Slots
    rows: int = 0
    pool: RowPool | None = None
    rides: str | None = None
    running: dict[int, JobState] = field(default_factory=dict)  # row → sequence
    waiting: deque[JobState] = field(default_factory=deque)
    reported: tuple[int, int] = (0, 0)  # speculative rungs: (drafted, accepted) told so far

    def __post_init__(self) -> None:
        self.rows = self.rows or self.slots.max_batch
        if self.pool is None:
            self.pool = RowPool(self.slots.max_batch)

    @property
    def has_free(self) -> bool:
        """A waiting request can take a row now."""
        assert self.pool is not None
        return len(self.running) < self.rows and len(self.pool) > 0

    def take_row(self) -> int:
        assert self.pool is not None
        return self.pool.take()

    def give_row(self, row: int) -> None:
        assert self.pool is not None
        self.pool.give(row)

    def riders(self, now: float) -> Riders | None:
        """Its ready rows as riders of a speculative rung's draft steps (each up to the tokens
        it may still take), or None when none is ready."""
        rows = sorted(r for r, s in self.running.items()
                      if s.ready and s.remaining > 0 and not s.job.expired(now))
        if not rows:
            return None
        states = [self.running[r] for r in rows]
        return Riders(rows, [s.last_token for s in states], [s.sampler for s in states],
                      [s.remaining for s in states])

    def new_speculation(self) -> tuple[int, int] | None:
        """A speculative rung's drafted and accepted tokens since the last call (None for
        every other variant)."""
        if self.slots.speculation is None:
            return None
        drafted, accepted = self.slots.speculation
        new = (drafted - self.reported[0], accepted - self.reported[1])
        self.reported = (drafted, accepted)
        return new


def batches_for(engines: Mapping[str, Engine], max_batch: int, max_len: int) -> dict[str, Batch]:
    """Each variant's batch. A speculative rung whose draft is a loaded rung with shared-KV
    slots keeps its draft rows in that rung's KV buffer (room for both batches' rows, one row
    pool, each batch at most ``max_batch`` rows) and that rung's rows ride its draft steps:
    a draft row then costs a wide step's increment, not a narrow step of its own."""
    out: dict[str, Batch] = {}
    for name, spec in engines.items():
        if not isinstance(spec, SpeculativeEngine):
            continue
        draft = next((n for n, e in engines.items() if e is spec.draft and n not in out), None)
        if draft is None or not isinstance(spec.draft, OrtEngine) or not spec.draft.shared_kv:
            continue
        slots = KVSlots(spec.draft, 2 * max_batch, max_len + spec.k + 1)
        rows = RowPool(slots.max_batch)
        out[draft] = Batch(draft, slots, rows=max_batch, pool=rows)
        out[name] = Batch(name, spec.own_slots(max_batch, max_len, slots, rows), rides=draft)
    return {name: out.get(name) or Batch(name, slots_for(engine, max_batch, max_len))
            for name, engine in engines.items()}
