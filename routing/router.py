"""The router: the policy plus per-variant cost models that learn from every observed step.

Thread-safe (requests decide on the event loop, observations arrive from lane threads); no I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping

from routing.cost import CostModel
from routing.policy import Budget, Decision, OnInfeasible, VariantState, decide
from routing.timeline import Load

__all__ = ["Load", "Router"]


class Router:
    """Holds the ladder's profiles; ``decide`` for a request, ``observe`` after it ran."""

    def __init__(self, qualities: Mapping[str, float], costs: Mapping[str, CostModel],
                 reference: str | Collection[str] = "full",
                 on_infeasible: OnInfeasible = "best_effort",
                 speculative: Collection[str] = (), speculate_below_rows: int = 1) -> None:
        """``reference``: the variant(s) that give the reference model's exact output (full,
        and a speculative rung): the only ones a quality floor of 1.0 accepts.

        ``speculative``: rungs that buy speed with spare compute (a draft's tokens verified
        in one pass of the target, row by row). They are offered only while fewer than
        ``speculate_below_rows`` rows run on the device: under load the target's continuous
        batch serves a new row for a fraction of a step, while a speculative row pays whole
        draft and verify passes and holds up every other row's step (vLLM turns speculation
        off by batch size for the same reason)."""
        self._lock = threading.Lock()
        self._quality = dict(qualities)
        self._costs = dict(costs)
        self._reference = {reference} if isinstance(reference, str) else set(reference)
        self.on_infeasible: OnInfeasible = on_infeasible
        self._speculative = set(speculative)
        self.speculate_below_rows = speculate_below_rows

    def states(self, available: set[str], load: Mapping[str, Load]) -> list[VariantState]:
        """Each variant's profile now (copies: deciding needs no lock)."""
        with self._lock:
            costs = {name: cost.copy() for name, cost in self._costs.items()}
        busy = sum(lo.occupancy for lo in load.values()) >= self.speculate_below_rows
        return [VariantState(name, self._quality[name], cost, name in available,
                             name in self._reference,
                             paused=busy and name in self._speculative)
                for name, cost in costs.items()]

    def decide(self, budget: Budget, prompt_tokens: int, new_tokens: int, available: set[str],
               load: Mapping[str, Load], pinned: str | None = None,
               power_capped: bool = False) -> Decision:
        """``load``: per variant, its rows now (a variant missing from it is idle)."""
        return decide(self.states(available, load), budget, prompt_tokens, new_tokens,
                      pinned, self.on_infeasible, power_capped, load)

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

    def observe_power(self, variant: str, joules: float, seconds: float) -> None:
        with self._lock:
            self._costs[variant].observe_power(joules, seconds)

    def step_ms(self, variant: str, rows: int) -> float:
        with self._lock:
            return self._costs[variant].step_ms(rows)

    def coefficients(self) -> dict[str, dict[str, float | int | list[float]]]:
        with self._lock:
            return {name: cost.as_dict() for name, cost in self._costs.items()}
