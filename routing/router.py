"""The router: the policy plus per-variant cost models that learn from every finished request.

Thread-safe (requests decide on the event loop, observations arrive from lane threads); no I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace

from routing.cost import CostModel
from routing.policy import Budget, Decision, OnInfeasible, VariantState, decide


class Router:
    """Holds the ladder's profiles; ``decide`` for a request, ``observe`` after it ran."""

    def __init__(self, qualities: Mapping[str, float], costs: Mapping[str, CostModel],
                 reference: str = "full", on_infeasible: OnInfeasible = "best_effort") -> None:
        self._lock = threading.Lock()
        self._quality = dict(qualities)
        self._costs = dict(costs)
        self._reference = reference
        self.on_infeasible: OnInfeasible = on_infeasible

    def states(self, available: set[str], queue_wait_ms: Mapping[str, float]) -> list[VariantState]:
        with self._lock:
            return [VariantState(name, self._quality[name], replace(cost),
                                 queue_wait_ms.get(name, 0.0), name in available,
                                 name == self._reference)
                    for name, cost in self._costs.items()]

    def decide(self, budget: Budget, prompt_tokens: int, new_tokens: int, available: set[str],
               queue_wait_ms: Mapping[str, float], pinned: str | None = None,
               power_capped: bool = False) -> Decision:
        return decide(self.states(available, queue_wait_ms), budget, prompt_tokens, new_tokens,
                      pinned, self.on_infeasible, power_capped)

    def observe(self, variant: str, prompt_tokens: int, new_tokens: int, first_token_ms: float,
                run_ms: float, joules: float) -> None:
        with self._lock:
            self._costs[variant].observe(prompt_tokens, new_tokens, first_token_ms, run_ms,
                                         joules)

    def coefficients(self) -> dict[str, dict[str, float | int]]:
        with self._lock:
            return {name: cost.as_dict() for name, cost in self._costs.items()}
