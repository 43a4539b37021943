"""The cost model learns from observations."""

from __future__ import annotations

import pytest

from routing.cost import CostModel
from routing.policy import Budget, VariantState, decide


def test_observations_move_predictions_toward_what_happened() -> None:
    m = CostModel(prefill_ms_per_token=1.0, decode_ms_per_token=5.0, watts=10.0)
    for _ in range(40):  # the host is really 2x slower per token and draws 15 W
        m.observe(prompt_tokens=20, new_tokens=50, first_token_ms=50.0, run_ms=540.0,
                  joules=8.1)
    assert m.decode_ms_per_token == pytest.approx(10.0, rel=0.01)
    assert m.prefill_ms_per_token == pytest.approx(2.0, rel=0.05)
    assert m.watts == pytest.approx(15.0, rel=0.01)
    assert m.observations == 40


def test_a_variant_that_becomes_slow_loses_traffic() -> None:
    fast = CostModel(0.5, 2.0, 10.0)
    slow = CostModel(0.5, 4.0, 10.0)
    vs = [VariantState("a", 0.9, fast), VariantState("b", 0.9, slow)]
    assert decide(vs, Budget(10_000, 0.5), 10, 50).variant == "a"
    for _ in range(20):
        fast.observe(10, 50, first_token_ms=20.0, run_ms=20.0 + 49 * 8.0, joules=4.0)
    assert decide(vs, Budget(10_000, 0.5), 10, 50).variant == "b"
