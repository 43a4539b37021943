"""The routing policy (docs/architecture.md, "Routing").

Every candidate is priced over the request's lifetime by :class:`routing.timeline.Timeline`.
Among variants whose measured quality meets the floor, whose predicted latency fits the budget,
whose predicted attributed joules fit ``max_joules`` and that would make no running row miss
its own budget, pick the lowest predicted *marginal* joules — what serving it adds to the
device's energy: a busy batch's extra row for as long as that batch runs, against an idle
variant's whole steps plus the switches it adds to every turn. Ties go to the higher quality.

Nothing feasible: reject, or best effort — among the variants meeting the floor (those that
make the fewest running rows late), the ones whose time lost by everyone (own latency plus the
delay added to the running rows) is within :data:`BEST_EFFORT_SLACK` of the least, and of
those the cheapest in marginal joules: under overload a new row of a busy batch delays everyone
far less than starting another variant's steps, and a budget that will be missed anyway is
missed by about as much on a variant that costs far less. A paused speculative rung (the
device is busy) is never chosen, not even as best effort. A floor of 1.0 asks for the
reference model itself: an approximation's measured quality above 1.0 is measurement noise,
not an improvement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from routing.cost import CostModel
from routing.timeline import Load, Timeline

OnInfeasible = Literal["best_effort", "reject"]
Reason = Literal["cheapest_feasible", "best_effort", "pinned", "power_cap"]
BEST_EFFORT_SLACK = 1.25  # best effort: within this factor of the least time lost


@dataclass(frozen=True)
class VariantState:
    """What the router knows of one variant right now (its load is in the timeline)."""

    name: str
    quality: float
    cost: CostModel
    available: bool = True
    reference: bool = False  # the full model the others are measured against
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
    rows_made_late: int  # running rows whose own budget it would break
    delay_ms: float  # what it adds to the running rows' runs, summed
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
             new_tokens: int, load: Mapping[str, Load] | None = None,
             expected_tokens: int | None = None) -> list[Candidate]:
    """Every variant's lifetime predictions under ``load`` (default: an idle device) and
    whether (and why not) it is eligible. Latency (and the energy cap) on the bounds
    (``new_tokens``, each row's tokens left); the joules minimised and reported over the
    expected lengths (``expected_tokens``, each row's ``Load.expected``) where known."""
    load = load or {}
    costs = {v.name: v.cost for v in variants}
    timeline = Timeline(costs, load, new_tokens)
    expected = expected_tokens or new_tokens
    energy = (Timeline(costs, load, expected, expected=True)
              if expected != new_tokens or any(lo.expected for lo in load.values())
              else timeline)
    out = []
    for v in variants:
        lo = load.get(v.name, Load())
        bound = timeline.price(v.name, prompt_tokens, new_tokens, lo.queue_wait_ms)
        likely = (energy.price(v.name, prompt_tokens, expected, lo.queue_wait_ms)
                  if energy is not timeline else bound)
        p = replace(bound, marginal_joules=likely.marginal_joules)
        if not v.available:
            why = "unavailable"
        elif not meets_floor(v, budget.min_quality):
            why = "quality_below_floor"
        elif v.paused:
            why = "speculation_paused_under_load"
        elif p.latency_ms > budget.latency_ms:
            why = "over_latency_budget"
        elif budget.max_joules is not None and p.attributed_joules > budget.max_joules:
            why = "over_energy_budget"
        elif p.rows_made_late:
            why = "would_make_running_rows_late"
        else:
            why = "ok"
        out.append(Candidate(v.name, v.quality, p.latency_ms, likely.attributed_joules,
                             p.marginal_joules, lo.occupancy, p.rows_made_late, p.delay_ms,
                             why == "ok", why))
    return out


def _cheapest(cands: Sequence[Candidate]) -> Candidate:
    return min(cands, key=lambda c: (c.predicted_marginal_joules, -c.quality))


def best_effort(cands: Sequence[Candidate]) -> Candidate:
    """Among ``cands`` (all meeting the floor): make the fewest running rows late; keep the
    time lost by everyone (its own latency plus the delay it adds to the running rows) near
    the least; and then spend the least."""
    fewest = min(c.rows_made_late for c in cands)
    least_harm = [c for c in cands if c.rows_made_late == fewest]

    def lost(c: Candidate) -> float:
        return c.predicted_latency_ms + c.delay_ms

    least = min(lost(c) for c in least_harm)
    near = [c for c in least_harm if lost(c) <= BEST_EFFORT_SLACK * least]
    return _cheapest(near)


def decide(variants: Sequence[VariantState], budget: Budget, prompt_tokens: int,
           new_tokens: int, pinned: str | None = None,
           on_infeasible: OnInfeasible = "best_effort", power_capped: bool = False,
           load: Mapping[str, Load] | None = None,
           expected_tokens: int | None = None) -> Decision:
    """Choose the variant for one request (pure; well under a millisecond)."""
    cands = evaluate(variants, budget, prompt_tokens, new_tokens, load, expected_tokens)
    by_name = {c.variant: c for c in cands}
    if pinned is not None:
        c = by_name[pinned]
        return Decision(pinned, "pinned", c.predicted_latency_ms, c.predicted_joules, cands)
    floor_ok = [c for c, v in zip(cands, variants, strict=True)
                if offered(v, budget.min_quality)]
    if power_capped and floor_ok:  # shed energy: cheapest variant the floor allows
        c = _cheapest(floor_ok)
        return Decision(c.variant, "power_cap", c.predicted_latency_ms, c.predicted_joules,
                        cands)
    feasible = [c for c in cands if c.eligible]
    if feasible:
        c = _cheapest(feasible)
        return Decision(c.variant, "cheapest_feasible", c.predicted_latency_ms,
                        c.predicted_joules, cands)
    if on_infeasible == "reject" or not floor_ok:
        best = min(floor_ok, key=lambda c: c.predicted_latency_ms) if floor_ok else None
        achievable = f"{best.predicted_latency_ms:.0f} ms" if best else "none"
        raise InfeasibleError(
            f"no variant meets quality >= {budget.min_quality:g} within "
            f"{budget.latency_ms:g} ms"
            + (f" and {budget.max_joules:g} J" if budget.max_joules is not None else "")
            + f"; best achievable latency at that quality: {achievable}",
            best.predicted_latency_ms if best else None)
    c = best_effort(floor_ok)
    return Decision(c.variant, "best_effort", c.predicted_latency_ms, c.predicted_joules,
                    cands)
