"""Expected answer lengths (routing.lengths) and their use: energy priced over what answers
are expected to use, latency over their bounds."""

from __future__ import annotations

import pytest

from routing.cost import CostModel
from routing.lengths import LengthModel, length_class
from routing.policy import Budget
from routing.router import Router
from routing.timeline import Load


def test_classes_are_powers_of_two() -> None:
    assert [length_class(n) for n in (0, 1, 2, 3, 64, 65, 1000)] == [1, 1, 2, 4, 64, 128, 1024]


def test_the_bound_until_a_class_has_answers_then_what_they_used() -> None:
    m = LengthModel(alpha=0.1, min_observations=4)
    for _ in range(3):
        m.observe(64, 32)
    assert m.expected(64) == 64  # three answers are not enough
    m.observe(64, 32)
    assert m.expected(64) == 32 and m.expected(50) == 25  # 50 and 64: one class
    assert m.expected(256) == 256  # another class knows nothing yet
    m.observe(64, 640)  # an answer is never longer than its bound: counts as 1.0
    assert m.fraction(64) == pytest.approx(0.5 + 0.5 / 5)  # the first answers average plainly
    # a running answer: expected tokens left, at least 1 while it runs, within its bound
    assert m.expected_left(64, 10) == m.expected(64) - 10
    assert m.expected_left(64, 60) == 1  # past its expectation: expected to end soon
    assert m.expected_left(64, 64) == 0
    assert m.as_dict()["64"]["answers"] == 5


def test_energy_is_priced_over_expected_lengths_latency_over_bounds() -> None:
    """full runs 8 rows; answers are learnt to use a quarter of their 256-token bound. The
    latency a new request is promised stays the bound's; its predicted joules fall, and with
    them the idle-start price of the other rung against joining full's batch."""
    def router() -> Router:
        costs = {"full": CostModel(0.5, 20.0, 20.0, widths={8: 30.0, 16: 40.0}),
                 "int8": CostModel(0.3, 8.0, 10.0, widths={8: 20.0, 16: 30.0})}
        return Router({"full": 1.0, "int8": 0.99}, costs)

    fresh, learnt = router(), router()
    for _ in range(8):
        learnt.observe_length(256, 64)
    rows = (200,) * 8
    bound = {"full": Load(rows, (float("inf"),) * 8)}
    known = {"full": Load(rows, (float("inf"),) * 8,
                          expected=tuple(learnt.expected_left(256, 256 - r) for r in rows))}
    a = fresh.decide(Budget(600_000, 0.9), 32, 256, {"full", "int8"}, bound)
    b = learnt.decide(Budget(600_000, 0.9), 32, 256, {"full", "int8"}, known)
    by_a = {c.variant: c for c in a.candidates}
    by_b = {c.variant: c for c in b.candidates}
    for v in ("full", "int8"):
        assert by_b[v].predicted_latency_ms == pytest.approx(by_a[v].predicted_latency_ms)
        assert by_b[v].predicted_joules < by_a[v].predicted_joules
        assert by_b[v].predicted_marginal_joules < by_a[v].predicted_marginal_joules
