"""What the router needs to know of the lane: each variant's rows (tokens left to their bounds
and expected, slack to their latency budgets), the predicted wait for a free row, and the free
rows inside a batch's width.
Read from the event loop without stopping the lane thread, so approximate by a step."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from routing.router import Load, Router
from serving.batch import Batch
from serving.job import JobState


def predict_load(batches: Mapping[str, Batch], inbox: Sequence[JobState], router: Router,
                 now: float | None = None) -> dict[str, Load]:
    """Each busy variant's rows: running ones and those submitted (they will be in the batch by
    the time a new request joins it), each with its tokens left and the ms left to its latency
    budget, plus the predicted wait for a free row."""
    now = time.perf_counter() if now is None else now
    pending: dict[str, list[JobState]] = {}
    for s in inbox:
        pending.setdefault(s.job.variant, []).append(s)
    cycle = cycle_ms(batches, router)
    out = {}
    for name, b in batches.items():
        running = list(b.running.values())
        waiting = list(b.waiting) + pending.get(name, [])
        if not running and not waiting:
            continue
        states = running + waiting
        rows = list(b.running)
        holes = max(rows) + 1 - len(rows) if rows else 0
        bounds = [s.job.params.max_new_tokens for s in states]
        out[name] = Load(tuple(max(0, s.remaining) for s in states),
                         tuple(s.job.slack_ms(now) for s in states),
                         wait_ms(b, len(waiting), cycle),
                         max(0, holes - len(waiting)) if b.slots.batched else 0,
                         tuple(router.expected_left(m, m - max(0, s.remaining))
                               for m, s in zip(bounds, states, strict=True)))
    return out


def cycle_ms(batches: Mapping[str, Batch], router: Router) -> float:
    """One round-robin turn: a step of every busy variant."""
    return sum(router.step_ms(n, len(b.running)) for n, b in batches.items() if b.running)


def wait_ms(b: Batch, waiting: int, cycle: float) -> float:
    """Predicted wait for a row of ``b`` behind ``waiting`` others, at ``cycle`` ms a turn."""
    free = b.rows - len(b.running)
    if waiting < free:
        return 0.0
    remaining = sorted(s.remaining for s in list(b.running.values())) or [0]
    return remaining[min(waiting - free, len(remaining) - 1)] * cycle
