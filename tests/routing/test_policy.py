"""Routing policy, table-driven with synthetic profiles (no I/O, no models)."""

from __future__ import annotations

import math

import pytest

from routing.cost import CostModel
from routing.policy import Budget, InfeasibleError, VariantState, decide
from routing.router import Router
from routing.timeline import Load


def ladder() -> list[VariantState]:
    """full: slow/costly; int8: 2x faster; distilled: 4x faster, lower quality."""
    def v(name: str, q: float, decode: float, watts: float, ref: bool = False) -> VariantState:
        return VariantState(name, q, CostModel(prefill_ms_per_token=decode / 10,
                                               decode_ms_per_token=decode, watts=watts),
                            reference=ref)
    return [v("full", 1.0, 8.0, 20.0, ref=True), v("int8", 0.99, 4.0, 20.0),
            v("distilled", 0.83, 2.0, 18.0), v("distilled-int8", 0.82, 1.8, 18.0)]


CASES = [
    # (budget, prompt, new, expected variant, expected reason)
    (Budget(10_000, 0.0), 32, 64, "distilled-int8", "cheapest_feasible"),
    (Budget(10_000, 0.9), 32, 64, "int8", "cheapest_feasible"),
    (Budget(10_000, 1.0), 32, 64, "full", "cheapest_feasible"),
    (Budget(10_000, 0.995), 32, 64, "full", "cheapest_feasible"),
    (Budget(300, 0.9), 32, 64, "int8", "cheapest_feasible"),  # int8 ~269 ms fits
    (Budget(200, 0.9), 32, 64, "int8", "best_effort"),  # nothing at 0.9 fits: fastest
    (Budget(10_000, 0.0, max_joules=2.3), 32, 64, "distilled-int8", "cheapest_feasible"),
    (Budget(10_000, 0.9, max_joules=5.0), 32, 64, "int8", "best_effort"),  # int8 ~5.4 J
]


@pytest.mark.parametrize(("budget", "prompt", "new", "variant", "reason"), CASES)
def test_table(budget: Budget, prompt: int, new: int, variant: str, reason: str) -> None:
    d = decide(ladder(), budget, prompt, new)
    assert (d.variant, d.reason) == (variant, reason)
    chosen = next(c for c in d.candidates if c.variant == variant)
    assert d.predicted_joules == chosen.predicted_joules
    assert len(d.candidates) == 4


def test_candidates_say_why_they_were_excluded() -> None:
    d = decide(ladder(), Budget(300, 0.9), 32, 64)
    why = {c.variant: c.why for c in d.candidates}
    assert why == {"full": "over_latency_budget", "int8": "ok",
                   "distilled": "quality_below_floor", "distilled-int8": "quality_below_floor"}


def test_floor_of_one_means_the_reference_even_if_an_approximation_measures_above() -> None:
    vs = ladder()
    vs[1] = VariantState("int8", 1.002, vs[1].cost)  # noise made int8 "better" than full
    assert decide(vs, Budget(10_000, 1.0), 8, 8).variant == "full"


def test_ties_go_to_higher_quality() -> None:
    same = CostModel(1.0, 2.0, 10.0)
    vs = [VariantState("a", 0.9, same), VariantState("b", 0.95, same)]
    assert decide(vs, Budget(10_000, 0.0), 8, 8).variant == "b"


def test_reject_mode_names_best_achievable_latency() -> None:
    with pytest.raises(InfeasibleError, match="best achievable latency at that quality: 5"):
        decide(ladder(), Budget(100, 1.0), 32, 64, on_infeasible="reject")


def test_energy_cap_excludes_costly_variants() -> None:
    d = decide(ladder(), Budget(10_000, 0.9, max_joules=0.001), 32, 64)
    assert d.reason == "best_effort"
    assert {c.why for c in d.candidates if c.variant in ("full", "int8")} == {
        "over_energy_budget"}


def test_pinned_variant_wins_but_is_explained() -> None:
    d = decide(ladder(), Budget(1, 1.0), 32, 64, pinned="distilled")
    assert (d.variant, d.reason) == ("distilled", "pinned")
    assert not next(c for c in d.candidates if c.variant == "distilled").eligible


def test_queue_wait_counts_against_the_budget() -> None:
    idle = decide(ladder(), Budget(600, 1.0), 32, 64)
    assert (idle.variant, idle.reason) == ("full", "cheapest_feasible")
    waiting = decide(ladder(), Budget(600, 1.0), 32, 64, load={"full": Load(queue_wait_ms=500)})
    assert (waiting.variant, waiting.reason) == ("full", "best_effort")
    full = next(c for c in waiting.candidates if c.variant == "full")
    assert full.why == "over_latency_budget"
    assert full.predicted_latency_ms == pytest.approx(500 + idle.predicted_latency_ms)


def test_unavailable_variants_are_skipped() -> None:
    vs = ladder()
    vs[3] = VariantState("distilled-int8", 0.82, vs[3].cost, available=False)
    assert decide(vs, Budget(10_000, 0.0), 32, 64).variant == "distilled"


def test_power_cap_sheds_to_cheapest_allowed_by_the_floor() -> None:
    d = decide(ladder(), Budget(10_000, 0.9), 32, 64, power_capped=True)
    assert (d.variant, d.reason) == ("int8", "power_cap")


def spec_router(speculate_below_rows: int = 1) -> Router:
    """full (20 ms/token), its speculative rung (12 ms/token, rows not batched), int8."""
    costs = {"full": CostModel(1.0, 20.0, 20.0, step_ms_per_row=3.0),
             "full-speculative": CostModel(1.5, 12.0, 20.0, step_ms_per_row=12.0),
             "int8": CostModel(0.6, 7.0, 20.0, step_ms_per_row=2.0)}
    return Router({"full": 1.0, "full-speculative": 1.0, "int8": 0.99}, costs,
                  reference={"full", "full-speculative"}, speculative={"full-speculative"},
                  speculate_below_rows=speculate_below_rows)


def test_speculation_is_offered_on_a_quiet_device_and_paused_under_load() -> None:
    names = {"full", "full-speculative", "int8"}
    floor_one = Budget(60_000, 1.0)
    quiet = spec_router().decide(floor_one, 16, 64, names, {})
    assert quiet.variant == "full-speculative"  # 12 ms a token against full's 20
    # one row running anywhere (here int8's): a new row of full's batch costs a whole step
    # while it runs alone, but the speculative row would stall int8's row for its passes
    busy = spec_router().decide(floor_one, 16, 64, names, {"int8": Load.rows(1, 64)})
    why = {c.variant: c.why for c in busy.candidates}
    assert busy.variant == "full"
    assert why["full-speculative"] == "speculation_paused_under_load"
    # a budget nothing meets: best effort is the fastest *offered* variant, never the paused one
    # (unpaused, the rung would be the faster: 12 + 11 ms a token against 20 + 11)
    tight = spec_router().decide(Budget(1.0, 1.0), 16, 64, names, {"int8": Load.rows(3, 64)})
    assert (tight.variant, tight.reason) == ("full", "best_effort")
    # the threshold is a setting: 0 never speculates, a higher one tolerates a few rows
    assert spec_router(0).decide(floor_one, 16, 64, names, {}).variant == "full"
    assert spec_router(4).decide(floor_one, 16, 64, names,
                                 {"int8": Load.rows(2, 64)}).variant == "full-speculative"


def test_the_batched_speculative_rung_is_priced_at_the_widths_of_both_batches() -> None:
    """Unpaused by default: a floor-1.0 request goes to the speculative rung where a row of it
    costs less than a row of full's batch at the widths they run now, and to full where
    full's batch is already wide (a row there costs a fraction of a step)."""
    costs = {"full": CostModel(1.0, 20.0, 20.0, widths={4: 22.0, 8: 25.0, 16: 30.0}),
             "full-speculative": CostModel(1.5, 12.0, 20.0,
                                           widths={4: 14.0, 8: 20.0, 16: 35.0})}
    router = Router({"full": 1.0, "full-speculative": 1.0}, costs,
                    reference={"full", "full-speculative"}, speculative={"full-speculative"})
    names, floor_one = set(costs), Budget(60_000, 1.0)
    assert router.decide(floor_one, 16, 64, names, {}).variant == "full-speculative"
    wide_full = router.decide(floor_one, 16, 64, names, {"full": Load.rows(8, 64)})
    assert wide_full.variant == "full"
    busy_spec = router.decide(floor_one, 16, 64, names, {"full-speculative": Load.rows(4, 64)})
    assert busy_spec.variant == "full-speculative"
    assert all(c.why != "speculation_paused_under_load" for c in busy_spec.candidates)


def _stream(costs: dict[str, CostModel], n: int = 48) -> list[tuple[float, str]]:
    """Requests arriving one every four turns, every sixth one at floor 1.0 (only ``full``;
    the bench's mix), the rest at 0.9; each holds its row for 64 tokens. Returns (floor,
    chosen) in order."""
    router = Router({"full": 1.0, "int8": 0.99}, costs)
    left: dict[str, list[int]] = {"full": [], "int8": []}
    out = []
    for i in range(n):
        floor = 1.0 if i % 6 == 5 else 0.9
        load = {u: Load(tuple(sorted(r)), (math.inf,) * len(r)) for u, r in left.items() if r}
        d = router.decide(Budget(600_000, floor), 32, 64, {"full", "int8"}, load)
        out.append((floor, d.variant))
        left[d.variant].append(64)
        left = {u: [t - 4 for t in r if t > 4] for u, r in left.items()}
    return out


def _full_and_int8(int8_widths: dict[int, float],
                   int8_watts: dict[int, float] | None) -> dict[str, CostModel]:
    return {"full": CostModel(0.5, 20.0, 20.0, widths={4: 24.0, 8: 30.0, 16: 40.0}),
            "int8": CostModel(0.3, 8.0, 10.0, widths=int8_widths, watts_widths=int8_watts)}


def test_under_load_the_router_consolidates_where_wide_steps_are_cheapest() -> None:
    """int8 is cheap alone (8 ms at 10 W against 20 ms at 20 W). This machine's case: from four
    rows int8 steps on its wide session at full's power and costs about full's time, so a
    request joining int8 costs what joining full's batch does *and* keeps a second batch
    alive; the quantized rows go where full's floor-1.0 rows already run. Where int8's wide
    steps are really cheaper, they go to int8. Priced with one power per variant (the
    narrow steps'), the router sent them to int8 on this machine too."""
    wide = {4: 24.0, 8: 31.0, 16: 42.0}
    costly = _stream(_full_and_int8(wide, {4: 20.0}))
    cheap = _stream(_full_and_int8({4: 10.0, 8: 13.0, 16: 18.0}, None))
    misread = _stream(_full_and_int8(wide, None))  # the old single-figure power

    def on_int8(run: list[tuple[float, str]]) -> int:
        return sum(1 for floor, v in run[8:] if floor < 1.0 and v == "int8")  # past warm-up

    quantizable = sum(1 for floor, _ in costly[8:] if floor < 1.0)
    assert all(v == "full" for floor, v in costly + cheap + misread if floor == 1.0)
    assert on_int8(costly) <= quantizable // 4  # consolidated onto full
    assert on_int8(cheap) >= 3 * quantizable // 4
    assert on_int8(misread) >= 3 * quantizable // 4  # the bug this pricing fixes
