"""The routing policy (ARCHITECTURE.md, "Routing").

Among variants whose measured quality meets the floor and whose predicted latency (queue wait
+ run, in the batch it would join) fits the budget (and whose predicted attributed joules fit
``max_joules``), pick the lowest predicted *marginal* joules — what serving it adds to the
device's energy, so a busy batch's extra row can beat an idle cheaper variant; ties go to the
higher quality. Nothing feasible: best effort (the fastest
variant meeting the floor) or reject. A paused speculative rung (the device is busy) is never
chosen, not even as best effort. A floor of 1.0 asks for the reference model itself: an
approximation's measured quality above 1.0 is measurement noise, not an improvement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from routing.cost import CostModel

OnInfeasible = Literal["best_effort", "reject"]
Reason = Literal["cheapest_feasible", "best_effort", "pinned", "power_cap"]


@dataclass(frozen=True)
class VariantState:
    """What the router knows of one variant right now."""

    name: str
    quality: float
    cost: CostModel
    queue_wait_ms: float = 0.0
    available: bool = True
    reference: bool = False  # the full model the others are measured against
    occupancy: int = 0  # rows in its running batch the request would join
    others_ms: float = 0.0  # other variants' steps interleaved with each of its steps (ms)
    paused: bool = False  # a speculative rung while the device is busy (see Router)


@dataclass(frozen=True)
class Budget:
    latency_ms: float
    min_quality: float
    max_joules: float | None = None


@dataclass(frozen=True)
class Candidate:
    variant: str
    quality: float
    predicted_latency_ms: float
    predicted_joules: float  # its attributed share: what max_joules caps and it is charged
    predicted_marginal_joules: float  # what it adds to the device's energy: what is minimised
    occupancy: int  # rows already in the batch it would join
    eligible: bool
    why: str  # "ok" or the first rule it failed


@dataclass(frozen=True)
class Decision:
    variant: str
    reason: Reason
    predicted_latency_ms: float
    predicted_joules: float
    candidates: list[Candidate] = field(default_factory=list)


class InfeasibleError(Exception):
    """No variant meets the budget and the server rejects such requests."""

    def __init__(self, message: str, best_latency_ms: float | None) -> None:
        super().__init__(message)
        self.best_latency_ms = best_latency_ms


def meets_floor(v: VariantState, floor: float) -> bool:
    if floor >= 1.0:
        return v.reference
    return v.reference or min(v.quality, 1.0) >= floor


def offered(v: VariantState, floor: float) -> bool:
    """Available, not paused, and meeting the floor: what best effort and a power cap pick
    from when latency no longer decides."""
    return v.available and not v.paused and meets_floor(v, floor)


def evaluate(variants: Sequence[VariantState], budget: Budget, prompt_tokens: int,
             new_tokens: int) -> list[Candidate]:
    """Every variant's predictions and whether (and why not) it is eligible."""
    out = []
    for v in variants:
        latency = v.queue_wait_ms + v.cost.predict_run_ms(prompt_tokens, new_tokens,
                                                          v.occupancy, v.others_ms)
        joules = v.cost.predict_joules(prompt_tokens, new_tokens, v.occupancy)
        marginal = v.cost.marginal_joules(prompt_tokens, new_tokens, v.occupancy)
        if not v.available:
            why = "unavailable"
        elif not meets_floor(v, budget.min_quality):
            why = "quality_below_floor"
        elif v.paused:
            why = "speculation_paused_under_load"
        elif latency > budget.latency_ms:
            why = "over_latency_budget"
        elif budget.max_joules is not None and joules > budget.max_joules:
            why = "over_energy_budget"
        else:
            why = "ok"
        out.append(Candidate(v.name, v.quality, latency, joules, marginal, v.occupancy,
                             why == "ok", why))
    return out


def decide(variants: Sequence[VariantState], budget: Budget, prompt_tokens: int,
           new_tokens: int, pinned: str | None = None,
           on_infeasible: OnInfeasible = "best_effort", power_capped: bool = False) -> Decision:
    """Choose the variant for one request (pure; microseconds)."""
    cands = evaluate(variants, budget, prompt_tokens, new_tokens)
    by_name = {c.variant: c for c in cands}
    if pinned is not None:
        c = by_name[pinned]
        return Decision(pinned, "pinned", c.predicted_latency_ms, c.predicted_joules, cands)
    if power_capped:  # shed energy: cheapest variant the quality floor allows, latency aside
        floor_ok = [c for c, v in zip(cands, variants, strict=True)
                    if offered(v, budget.min_quality)]
        if floor_ok:
            c = min(floor_ok, key=lambda c: (c.predicted_marginal_joules, -c.quality))
            return Decision(c.variant, "power_cap", c.predicted_latency_ms,
                            c.predicted_joules, cands)
    feasible = [c for c in cands if c.eligible]
    if feasible:
        c = min(feasible, key=lambda c: (c.predicted_marginal_joules, -c.quality))
        return Decision(c.variant, "cheapest_feasible", c.predicted_latency_ms,
                        c.predicted_joules, cands)
    floor_ok = [c for c, v in zip(cands, variants, strict=True)
                if offered(v, budget.min_quality)]
    best = min(floor_ok, key=lambda c: c.predicted_latency_ms) if floor_ok else None
    if on_infeasible == "reject" or best is None:
        achievable = f"{best.predicted_latency_ms:.0f} ms" if best else "none"
        raise InfeasibleError(
            f"no variant meets quality >= {budget.min_quality:g} within "
            f"{budget.latency_ms:g} ms"
            + (f" and {budget.max_joules:g} J" if budget.max_joules is not None else "")
            + f"; best achievable latency at that quality: {achievable}",
            best.predicted_latency_ms if best else None)
    return Decision(best.variant, "best_effort", best.predicted_latency_ms,
                    best.predicted_joules, cands)
