"""The cost model: batch-aware predictions, and learning from observed steps and prefills."""

from __future__ import annotations

import pytest

from routing.cost import CostModel
from routing.policy import Budget, VariantState, decide
from routing.router import Load, Router


def test_steps_at_several_batch_sizes_fit_level_and_slope() -> None:
    m = CostModel(prefill_ms_per_token=1.0, decode_ms_per_token=5.0, watts=10.0)
    for k in range(200):  # the host: 20 ms for one row, +3 ms per extra row
        rows = 1 + k % 8
        m.observe_step(rows, 20.0 + 3.0 * (rows - 1))
    assert m.decode_ms_per_token == pytest.approx(20.0, rel=0.02)
    assert m.step_ms_per_row == pytest.approx(3.0, rel=0.05)
    assert m.step_ms(16) == pytest.approx(65.0, rel=0.03)
    assert m.observations == 200


def test_one_batch_size_moves_the_level_and_keeps_the_slope() -> None:
    m = CostModel(1.0, 10.0, 10.0, step_ms_per_row=2.0)
    for _ in range(300):
        m.observe_step(1, 30.0)
    assert m.step_ms(1) == pytest.approx(30.0, rel=0.02)
    assert m.step_ms_per_row > 0


def test_prefill_and_power_observations() -> None:
    m = CostModel(prefill_ms_per_token=1.0, decode_ms_per_token=5.0, watts=10.0)
    for _ in range(60):  # 100 prompt tokens in 5 + 100 x 2 ms; 15 W
        m.observe_prefill(100, 205.0)
        m.observe_power(1.5, 0.1)
    assert m.prefill_ms_per_token == pytest.approx(2.0, rel=0.01)
    assert m.watts == pytest.approx(15.0, rel=0.01)


def test_joining_a_busy_batch_costs_a_share_and_a_margin() -> None:
    m = CostModel(0.0, 20.0, 10.0, step_ms_per_row=2.0)
    # alone: every step is its own (20 ms x 10 W = 0.2 J per token)
    assert m.marginal_joules(0, 11, occupancy=0) == pytest.approx(
        m.predict_joules(0, 11, occupancy=0))
    # beside 7 rows: it adds 2 ms per step and is charged an eighth of a 34 ms step
    assert m.marginal_joules(0, 11, 7) == pytest.approx((20 + 10 * 2) / 1000 * 10)
    assert m.predict_joules(0, 11, 7) == pytest.approx((20 + 10 * 34 / 8) / 1000 * 10)
    # and waits for every step of the batch, plus the other variants' steps it interleaves with
    assert m.predict_run_ms(0, 11, 7, others_ms=5.0) == pytest.approx(20 + 10 * (34 + 5))


def test_a_variant_that_becomes_slow_loses_traffic() -> None:
    fast = CostModel(0.5, 2.0, 10.0)
    slow = CostModel(0.5, 4.0, 10.0)
    vs = [VariantState("a", 0.9, fast), VariantState("b", 0.9, slow)]
    assert decide(vs, Budget(10_000, 0.5), 10, 50).variant == "a"
    for _ in range(50):
        fast.observe_step(1, 8.0)
    assert decide(vs, Budget(10_000, 0.5), 10, 50).variant == "b"


def test_a_busy_higher_quality_batch_can_be_the_cheaper_place() -> None:
    """Idle, the small model is cheapest; with 12 rows running on the big one, one more row
    there adds less energy than starting the small model's steps."""
    router = Router({"full": 1.0, "small": 0.5},
                    {"full": CostModel(0.1, 30.0, 20.0, step_ms_per_row=1.0),
                     "small": CostModel(0.05, 8.0, 20.0, step_ms_per_row=0.5)})
    budget = Budget(100_000, 0.0)
    idle = router.decide(budget, 16, 64, {"full", "small"}, {})
    assert idle.variant == "small"
    busy = router.decide(budget, 16, 64, {"full", "small"},
                         {"full": Load(occupancy=12)})
    assert busy.variant == "full"
    by_name = {c.variant: c for c in busy.candidates}
    assert by_name["full"].occupancy == 12
    assert (by_name["full"].predicted_marginal_joules
            < by_name["small"].predicted_marginal_joules)
    # the small model would now also wait for full's steps, interleaved with its own
    assert by_name["small"].predicted_latency_ms > {c.variant: c for c in idle.candidates}[
        "small"].predicted_latency_ms
