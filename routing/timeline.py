"""Lifetime pricing: what a request costs over every step it will run, given the rows the
device already holds and how long each of them has left.

The lane runs exact round-robin: each *turn* is one step of every variant with running rows,
so every running row advances one token per turn, and a row with ``r`` tokens left leaves after
``r`` turns. From the rows' remaining tokens the device's next turns are known: at turn ``t``
variant ``u`` steps over ``rows_u(t)`` rows (those with ``r >= t``), and the turn takes

    D(t) = Σ_u step_u(rows_u(t)) + Σ_{u busy} switch_u   (the switches only while >= 2 are busy)

and costs ``E(t) = Σ_u (step_u(rows_u(t)) [+ switch_u]) × watts_u(rows_u(t))``: power is
priced at the step's width, as measured (:class:`routing.cost.CostModel`). A request of ``p`` prompt
tokens and ``n`` new tokens on variant ``v`` is prefilled once (``prefill_v(p)``, which delays
every running row by as much) and then holds a row of ``v`` for ``n − 1`` turns. So:

* its latency: ``wait + prefill_v(p) + Σ_{t < n} D'(t)`` (``'``: with the request);
* its marginal joules (what the device spends because of it; what routing minimises):
  ``prefill_v(p) × prefill_watts_v + Σ_t (E'(t) − E(t))``: joining a busy batch costs the row's
  increments for as long as that batch keeps running and whole steps once it would have
  drained; starting an idle variant costs its whole steps *and* the switches it adds to every
  turn of the variants already busy;
* its attributed joules (the ledger's share, what ``max_joules`` caps): its share of each of
  its variant's steps;
* the rows it would make late: rows whose budget the current plan meets and the new one does
  not (``slack`` ≥ their remaining time now, < with the request), and the delay it adds to
  all running rows together (what best effort keeps small when no budget can be kept).

A batched step runs over the prefix of rows up to the highest one in use, so free rows below it
(``holes``) cost as much as used ones; a new request fills the lowest free row, so it takes a
hole first. The timeline keeps the holes while the batch runs.

Remaining tokens are each row's ``max_new_tokens`` left, an upper bound (a row may end at EOS
sooner), for latencies, which stay conservative; energy is priced on a second timeline over
each row's *expected* tokens left and the request's expected length (:mod:`routing.lengths`),
so a busy batch's life is not overstated by its early stops. Pure numpy over at most
``max_new_tokens`` turns: well under a millisecond per decision (two timelines when lengths are
known).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from routing.cost import CostModel


@dataclass(frozen=True)
class Load:
    """A variant's rows as the executor sees them when a request arrives: running rows and
    those admitted at the next step (each: tokens it may still generate, and ms left to its
    latency budget, ``inf`` when it has none), plus the predicted wait for a free row."""

    remaining: tuple[int, ...] = ()
    slack_ms: tuple[float, ...] = ()
    queue_wait_ms: float = 0.0
    holes: int = 0  # free rows inside the step's width (a step covers rows 0 .. highest)
    expected: tuple[int, ...] = ()  # tokens each row is expected to still produce (empty:
    # ``remaining``, the bound); what energy is priced over (routing.lengths)

    @property
    def occupancy(self) -> int:
        return len(self.remaining)

    @classmethod
    def rows(cls, n: int, remaining: int, slack_ms: float = math.inf,
             queue_wait_ms: float = 0.0) -> Load:
        """``n`` rows with ``remaining`` tokens left each."""
        return cls((remaining,) * n, (slack_ms,) * n, queue_wait_ms)


@dataclass(frozen=True)
class Pricing:
    """One variant's predictions for a request (ms and joules)."""

    latency_ms: float
    marginal_joules: float
    attributed_joules: float
    rows_made_late: int  # running rows whose budget this request would break
    delay_ms: float = 0.0  # the time it adds to the running rows' remaining runs, summed


def _rows_left(remaining: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """At each turn ``t``, how many rows have ``>= t`` tokens left (``remaining`` sorted)."""
    return len(remaining) - np.searchsorted(remaining, turns, side="left")


class Timeline:
    """The device's next turns under ``load`` (see the module doc)."""

    def __init__(self, costs: Mapping[str, CostModel], load: Mapping[str, Load],
                 horizon: int, expected: bool = False) -> None:
        """``expected``: the rows run for their expected tokens left (``Load.expected``), not
        their bounds: the timeline energy is priced on."""
        self.costs = costs
        self.load = load
        left = {u: (lo.expected if expected and lo.expected else lo.remaining)
                for u, lo in load.items()}
        longest = max((max(r, default=0) for r in left.values()), default=0)
        self.horizon = max(1, horizon, longest)
        self._turns = np.arange(1, self.horizon + 1)
        self.rows = {u: _rows_left(np.sort(np.asarray(left[u], dtype=np.int64)),
                                   self._turns) if u in load else np.zeros(self.horizon, int)
                     for u in costs}
        self.holes = {u: np.full(self.horizon, load[u].holes if u in load else 0)
                      for u in costs}
        self.duration_ms, self.energy_mj = self._run(self.rows, self.holes)
        self._elapsed = np.cumsum(self.duration_ms)

    def _run(self, rows: Mapping[str, np.ndarray],
             holes: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Each turn's duration (ms) and energy (mJ) with ``rows`` per variant per turn (and
        ``holes`` inside each busy batch's width)."""
        duration = np.zeros(self.horizon)
        energy = np.zeros(self.horizon)
        busy = np.zeros(self.horizon, dtype=np.int64)
        steps = {}
        widths = {}
        for u, r in rows.items():
            widths[u] = r + holes[u] * (r > 0)
            steps[u] = self.costs[u].steps_ms(widths[u])
            busy += r > 0
        interleaved = busy >= 2
        for u, s in steps.items():
            cost = self.costs[u]
            if cost.switch_ms > 0:
                s = s + cost.switch_ms * ((rows[u] > 0) & interleaved)
            duration += s
            energy += s * cost.watts_many(widths[u])
        return duration, energy

    def price(self, variant: str, prompt_tokens: int, new_tokens: int,
              queue_wait_ms: float = 0.0) -> Pricing:
        """The request's predictions on ``variant`` (see the module doc)."""
        cost = self.costs[variant]
        prefill_ms = cost.prefill_ms(prompt_tokens)
        holds = self._turns < min(new_tokens, self.horizon + 1)  # turns 1 .. n-1
        rows = dict(self.rows)
        rows[variant] = self.rows[variant] + holds
        holes = dict(self.holes)
        # it takes the lowest free row, a hole while there is one, for as long as it runs
        holes[variant] = np.maximum(0, self.holes[variant] - holds)
        duration, energy = self._run(rows, holes)
        latency = (cost.overhead_ms + queue_wait_ms + prefill_ms
                   + float(duration[holds].sum()))
        prefill_mj = prefill_ms * cost.prefill_watts
        marginal = (prefill_mj + float((energy - self.energy_mj).sum())) / 1000
        mine = rows[variant][holds]
        width = mine + holes[variant][holds]
        step = cost.steps_ms(width)
        if cost.switch_ms > 0:  # a switched step's extra lands in the rows of that step
            others = sum((r[holds] > 0).astype(np.int64) for u, r in rows.items()
                         if u != variant)
            step = step + cost.switch_ms * (np.asarray(others) > 0)
        attributed = (prefill_mj + float((step / mine * cost.watts_many(width)).sum())) / 1000
        late, delay = self._effect(np.cumsum(duration) + prefill_ms)
        return Pricing(latency, max(0.0, marginal), attributed, late, delay)

    def _effect(self, elapsed_with: np.ndarray) -> tuple[int, float]:
        """On the running rows: how many the plan gets within budget now and would not with
        the request, and the ms it adds to their runs, summed."""
        late, delay = 0, 0.0
        for lo in self.load.values():
            for left, slack in zip(lo.remaining, lo.slack_ms, strict=False):
                if left < 1:
                    continue
                i = min(left, self.horizon) - 1
                delay += float(elapsed_with[i] - self._elapsed[i])
                if math.isfinite(slack):
                    late += bool(self._elapsed[i] <= slack < elapsed_with[i])
        return late, delay
