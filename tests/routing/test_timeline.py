"""Lifetime pricing and consolidation: what a request costs over the steps it will run."""

from __future__ import annotations

import pytest

from routing.cost import CostModel
from routing.policy import Budget, best_effort, decide, evaluate
from routing.router import Router
from routing.timeline import Load, Timeline


def flat(decode: float, per_row: float, watts: float = 10.0, switch: float = 0.0) -> CostModel:
    """A straight-line step (no prefill cost beyond one step)."""
    return CostModel(0.0, decode, watts, step_ms_per_row=per_row, switch_ms=switch)


def test_alone_on_an_idle_device_it_pays_every_whole_step() -> None:
    tl = Timeline({"a": flat(20.0, 2.0)}, {}, 11)
    p = tl.price("a", 0, 11)
    assert p.latency_ms == pytest.approx(20 + 10 * 20)  # prefill, then 10 steps
    assert p.marginal_joules == pytest.approx((20 + 10 * 20) / 1000 * 10)
    assert p.attributed_joules == pytest.approx(p.marginal_joules)
    assert p.rows_made_late == 0


def test_joining_a_batch_that_outlives_it_costs_the_rows_increment() -> None:
    tl = Timeline({"a": flat(20.0, 2.0)}, {"a": Load.rows(7, 100)}, 11)
    p = tl.price("a", 0, 11)
    assert p.marginal_joules == pytest.approx((20 + 10 * 2) / 1000 * 10)
    assert p.attributed_joules == pytest.approx((20 + 10 * 34 / 8) / 1000 * 10)
    assert p.latency_ms == pytest.approx(20 + 10 * 34)


def test_a_batch_about_to_drain_leaves_the_request_paying_whole_steps() -> None:
    """Seven rows with 3 tokens left: the request shares 3 steps, then runs alone for 7."""
    tl = Timeline({"a": flat(20.0, 2.0)}, {"a": Load.rows(7, 3)}, 11)
    p = tl.price("a", 0, 11)
    assert p.marginal_joules == pytest.approx((20 + 3 * 2 + 7 * 20) / 1000 * 10)
    assert p.latency_ms == pytest.approx(20 + 3 * 34 + 7 * 20)


def test_starting_an_idle_variant_pays_its_steps_and_the_switches_it_adds() -> None:
    costs = {"big": flat(30.0, 1.0, switch=3.0), "small": flat(8.0, 0.5, switch=2.0)}
    tl = Timeline(costs, {"big": Load.rows(4, 100)}, 11)
    p = tl.price("small", 0, 11)
    # each of its 10 turns: its own step and its switch, plus big's switch (now interleaved)
    assert p.marginal_joules == pytest.approx((8 + 10 * (8 + 2 + 3)) / 1000 * 10)
    # its latency waits for big's steps in every turn
    assert p.latency_ms == pytest.approx(8 + 10 * (8 + 2 + 33 + 3))


def test_a_request_that_would_make_a_running_row_late_is_not_eligible() -> None:
    costs = {"a": flat(20.0, 2.0), "b": flat(20.0, 2.0)}
    # a's one row has 10 tokens left and 230 ms: alone it needs 10 x 20 = 200 ms
    load = {"a": Load((10,), (230.0,))}
    cands = {c.variant: c for c in evaluate(
        [*_states(costs)], Budget(100_000, 0.0), 4, 11, load)}
    assert cands["a"].rows_made_late == 1  # joining: a prefill, then 22 ms steps: 240 ms
    assert not cands["a"].eligible
    assert cands["a"].why == "would_make_running_rows_late"
    assert cands["b"].rows_made_late == 1  # interleaving: 40 ms turns
    # with more slack nothing is broken
    roomy = {"a": Load((10,), (10_000.0,))}
    assert all(c.rows_made_late == 0 for c in evaluate(
        [*_states(costs)], Budget(100_000, 0.0), 4, 11, roomy))
    # a row already late is not counted against the newcomer
    late = {"a": Load((10,), (100.0,))}
    assert all(c.rows_made_late == 0 for c in evaluate(
        [*_states(costs)], Budget(100_000, 0.0), 4, 11, late))


def _states(costs: dict[str, CostModel]) -> list:  # type: ignore[type-arg]
    from routing.policy import VariantState

    return [VariantState(n, 1.0, c, reference=True) for n, c in costs.items()]


def router() -> Router:
    """full: 30 ms a step, +1 ms a row; small: 8 ms, +0.5 ms a row, lower quality."""
    return Router({"full": 1.0, "small": 0.6},
                  {"full": CostModel(0.1, 30.0, 20.0, step_ms_per_row=1.0, switch_ms=2.0),
                   "small": CostModel(0.05, 8.0, 20.0, step_ms_per_row=0.5, switch_ms=2.0)})


def test_consolidates_onto_a_busy_batch_that_will_keep_running() -> None:
    budget = Budget(100_000, 0.5)
    names = {"full", "small"}
    assert router().decide(budget, 16, 64, names, {}).variant == "small"  # idle: cheaper
    busy = router().decide(budget, 16, 64, names, {"full": Load.rows(12, 200)})
    assert busy.variant == "full"
    by = {c.variant: c for c in busy.candidates}
    assert by["full"].occupancy == 12
    assert by["full"].predicted_marginal_joules < by["small"].predicted_marginal_joules


def test_does_not_consolidate_onto_a_batch_that_is_about_to_drain() -> None:
    """Same busy full, but its rows end in 2 tokens: the request would keep full stepping
    alone for 60 more steps, dearer than small's whole steps."""
    d = router().decide(Budget(100_000, 0.5), 16, 64, {"full", "small"},
                        {"full": Load.rows(12, 2)})
    assert d.variant == "small"


def test_a_busy_cheap_variant_takes_a_request_a_costlier_idle_one_would_fit() -> None:
    # small is busy and meets the floor: joining it beats starting full's steps
    d = router().decide(Budget(100_000, 0.5), 16, 64, {"full", "small"},
                        {"small": Load.rows(3, 200)})
    assert d.variant == "small"


def test_best_effort_prefers_the_cheaper_of_near_equally_fast_variants() -> None:
    costs = {"fast": CostModel(0.0, 10.0, 40.0), "frugal": CostModel(0.0, 11.0, 10.0),
             "slow": CostModel(0.0, 30.0, 5.0)}
    cands = evaluate(_states(costs), Budget(1.0, 0.0), 4, 32)
    assert all(not c.eligible for c in cands)
    assert best_effort(cands).variant == "frugal"  # within 1.25x of fast, a quarter the watts
    d = decide(_states(costs), Budget(1.0, 0.0), 4, 32)
    assert (d.variant, d.reason) == ("frugal", "best_effort")


def test_free_rows_inside_the_width_cost_as_used_ones_and_are_filled_first() -> None:
    costs = {"a": flat(20.0, 2.0)}
    # 3 rows running at rows 0, 1 and 5: every step covers 6
    holed = Timeline(costs, {"a": Load((100, 100, 100), (float("inf"),) * 3, holes=3)}, 11)
    packed = Timeline(costs, {"a": Load.rows(3, 100)}, 11)
    assert holed.duration_ms[0] == pytest.approx(20 + 5 * 2)
    assert packed.duration_ms[0] == pytest.approx(20 + 2 * 2)
    # joining fills a hole: the width does not grow, only the row's share of the step
    p = holed.price("a", 0, 11)
    assert p.marginal_joules == pytest.approx(20 / 1000 * 10)  # its prefill alone
    assert p.latency_ms == pytest.approx(20 + 10 * 30)


def test_best_effort_makes_the_fewest_running_rows_late_first() -> None:
    from routing.policy import Candidate

    def cand(name: str, latency: float, joules: float, late: int) -> Candidate:
        return Candidate(name, 1.0, latency, joules, joules, 0, late, 0.0, False,
                         "over_latency_budget")

    cands = [cand("cheap-but-harmful", 100.0, 0.1, 3), cand("dearer", 110.0, 0.5, 1),
             cand("dearest", 100.0, 0.9, 1)]
    assert best_effort(cands).variant == "dearer"


def test_under_overload_best_effort_joins_the_busy_batch_rather_than_slow_everyone() -> None:
    """Every budget is already lost; starting the idle cheap variant would add its whole step
    to every turn of twelve running rows, joining full adds a row's increment."""
    costs = {"full": CostModel(0.0, 30.0, 20.0, step_ms_per_row=1.0),
             "small": CostModel(0.0, 10.0, 10.0, step_ms_per_row=1.0)}
    load = {"full": Load.rows(12, 100, slack_ms=-1.0)}
    from routing.policy import VariantState

    states = [VariantState("full", 1.0, costs["full"], reference=True),
              VariantState("small", 0.9, costs["small"])]
    d = decide(states, Budget(1.0, 0.5), 4, 50, load=load)
    by = {c.variant: c for c in d.candidates}
    assert by["small"].delay_ms > 5 * by["full"].delay_ms
    assert (d.variant, d.reason) == ("full", "best_effort")
