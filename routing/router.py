"""The router: the policy plus per-variant cost models that learn from every observed step.

Thread-safe (requests decide on the event loop, observations arrive from lane threads); no I/O.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Mapping

from routing.cost import CostModel
from routing.lengths import LengthModel
from routing.policy import Budget, Decision, OnInfeasible, VariantState, decide, evaluate
from routing.timeline import Load

__all__ = ["Load", "Router"]


class Router:
    """Holds the ladder's profiles; ``decide`` for a request, ``observe`` after it ran."""

    def __init__(self, qualities: Mapping[str, float], costs: Mapping[str, CostModel],
                 reference: str | Collection[str] = "full",
                 on_infeasible: OnInfeasible = "best_effort",
                 speculative: Collection[str] = (),
                 speculate_below_rows: int | None = None) -> None:
        """``reference``: the variant(s) that give the reference model's exact output (full,
        and a speculative rung): the only ones a quality floor of 1.0 accepts.

        ``speculative``: rungs that buy speed with spare compute (drafts verified by the
        target). Their rounds batch across rows, so they are priced like every rung, by their
        measured step table and power per width. ``speculate_below_rows`` (None: no limit)
        offers them only while fewer rows than that run on the device, for hosts where an
        operator measured that speculation does not pay under load (0: never)."""
        self._lock = threading.Lock()
        self._quality = dict(qualities)
        self._costs = dict(costs)
        self._reference = {reference} if isinstance(reference, str) else set(reference)
        self.on_infeasible: OnInfeasible = on_infeasible
        self._speculative = set(speculative)
        self.speculate_below_rows = speculate_below_rows
        self._lengths = LengthModel()

    def states(self, available: set[str], load: Mapping[str, Load]) -> list[VariantState]:
        """Each variant's profile now (copies: deciding needs no lock)."""
        with self._lock:
            costs = {name: cost.copy() for name, cost in self._costs.items()}
        limit = self.speculate_below_rows
        busy = limit is not None and sum(lo.occupancy for lo in load.values()) >= limit
        return [VariantState(name, self._quality[name], cost, name in available,
                             name in self._reference,
                             paused=busy and name in self._speculative)
                for name, cost in costs.items()]

    def decide(self, budget: Budget, prompt_tokens: int, new_tokens: int, available: set[str],
               load: Mapping[str, Load], pinned: str | None = None,
               power_capped: bool = False) -> Decision:
        """``load``: per variant, its rows now (a variant missing from it is idle).
        ``new_tokens`` is the request's bound; its energy is priced over its expected
        length (:mod:`routing.lengths`)."""
        with self._lock:
            expected = self._lengths.expected(new_tokens)
        return decide(self.states(available, load), budget, prompt_tokens, new_tokens,
                      pinned, self.on_infeasible, power_capped, load, expected)

    def marginal_joules_per_token(self, min_quality: float, prompt_tokens: int,
                                  new_tokens: int, available: set[str],
                                  load: Mapping[str, Load]) -> float:
        """What one more request (``prompt_tokens``, ``new_tokens``, no latency budget, floor
        ``min_quality``) would add to the device's joules now, per token it is expected to
        generate, on the cheapest rung that has a free row for it now (every rung when none
        has): the lifetime pricing's marginal joules, so it falls when a wide batch can take
        the request and rises when the only cheap batch is full. A signal for endpoint
        pickers (per replica); not an average, which would reward busy replicas. NaN when no
        loaded rung meets the floor."""
        with self._lock:
            expected = self._lengths.expected(new_tokens)
        cands = [c for c in evaluate(self.states(available, load), Budget(math.inf, min_quality),
                                     prompt_tokens, new_tokens, load, expected)
                 if c.why in ("ok", "would_make_running_rows_late")]
        now = [c for c in cands if load.get(c.variant, Load()).queue_wait_ms <= 0]
        if not cands:
            return math.nan
        return min(c.predicted_marginal_joules for c in (now or cands)) / expected

    def observe_length(self, max_tokens: int, produced: int) -> None:
        """An answer bounded by ``max_tokens`` ended by itself (EOS, a stop sequence or its
        bound) after ``produced`` tokens."""
        with self._lock:
            self._lengths.observe(max_tokens, produced)

    def expected_left(self, max_tokens: int, produced: int) -> int:
        """A running answer's expected tokens still to come."""
        with self._lock:
            return self._lengths.expected_left(max_tokens, produced)

    def observe_step(self, variant: str, width: int, ms: float, switched: bool = False) -> None:
        """A step of ``width`` rows took ``ms`` per token; ``switched``: the device's previous
        step was another variant's (its extra time is the switch's, not the table's)."""
        with self._lock:
            cost = self._costs[variant]
            if switched:
                cost.observe_switch(width, ms)
            else:
                cost.observe_step(width, ms)

    def observe_prefill(self, variant: str, prompt_tokens: int, ms: float) -> None:
        with self._lock:
            self._costs[variant].observe_prefill(prompt_tokens, ms)

    def observe_energy(self, variant: str, width: int, joules: float, seconds: float) -> None:
        """A step of ``width`` rows (0: a prefill) of ``variant`` was measured to cost
        ``joules`` over ``seconds``."""
        with self._lock:
            self._costs[variant].observe_energy(width, joules, seconds)

    def step_ms(self, variant: str, rows: int) -> float:
        with self._lock:
            return self._costs[variant].step_ms(rows)

    def coefficients(self) -> dict[str, dict[str, float | int | list[float]]]:
        with self._lock:
            return {name: cost.as_dict() for name, cost in self._costs.items()}

    def lengths(self) -> dict[str, dict[str, float | int]]:
        """Per length class (max_tokens rounded up to a power of two): the share used."""
        with self._lock:
            return self._lengths.as_dict()
